"""convert package (see docs/architecture.md)."""
