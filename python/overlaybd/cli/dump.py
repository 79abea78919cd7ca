"""overlaybd-dump (placeholder until implemented)."""


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("not implemented yet")
