"""snapshotter package (see docs/architecture.md)."""
