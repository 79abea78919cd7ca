"""config package (see docs/architecture.md)."""
