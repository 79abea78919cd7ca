"""fuse package (see docs/architecture.md)."""
