"""registry package (see docs/architecture.md)."""
