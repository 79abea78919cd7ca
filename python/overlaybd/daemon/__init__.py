"""overlaybd-tcmu, the device daemon: picks the TCMU or the FUSE frontend and serves images through it."""
