"""image package (see docs/architecture.md)."""
