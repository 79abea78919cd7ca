"""tcmu package (see docs/architecture.md)."""
