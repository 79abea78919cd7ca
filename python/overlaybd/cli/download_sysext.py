"""overlaybd-download-sysext: fetch a signed sysext update payload, verify it, write the image.

What ue-rs `download_sysext` does in Flatcar's initrd and update postinstall, for machines and tests
that do not have it: the signature is checked with the given public key before anything is written,
then every operation and the image hash; OUTDIR/NAME.raw appears only complete (temp file, fsync,
rename), so a failed or interrupted run never leaves an image that systemd-sysext would merge.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

TOOL = "overlaybd-download-sysext"


def _args(argv: list[str] | None) -> argparse.Namespace:
    from overlaybd import __version__

    ap = argparse.ArgumentParser(prog=TOOL, description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--version", action="version", version=f"{TOOL} {__version__}")
    ap.add_argument("-p", "--pubkey", required=True, metavar="PUBKEY.pem", help="RSA public key (PEM) to verify with")
    ap.add_argument("-o", "--output-dir", required=True, metavar="OUTDIR", help="directory for NAME.raw (created)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("-u", "--url", help="http(s) URL of the payload (e.g. .../flatcar-overlaybd.gz)")
    src.add_argument("-f", "--file", help="local payload file")
    ap.add_argument(
        "--name", default="flatcar-overlaybd", help="image name: writes OUTDIR/NAME.raw (default %(default)s)"
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="download time limit, seconds (default %(default)s)")
    ap.add_argument(
        "--retries", type=int, default=2, help="retries on connection errors and HTTP 5xx (default %(default)s)"
    )
    args = ap.parse_args(argv)
    if not args.name or "/" in args.name or args.name.startswith(".") or "\0" in args.name:
        ap.error(f"--name: {args.name!r} is not a plain file name")
    if args.timeout <= 0 or args.retries < 0:
        ap.error("--timeout must be > 0 and --retries >= 0")
    return args


def _run(args: argparse.Namespace) -> str:
    from overlaybd import __version__
    from overlaybd.format.atomic import AtomicOutput
    from overlaybd.update_payload import verify_and_extract
    from overlaybd.update_payload.fetch import check_url, fetch
    from overlaybd.update_payload.layout import load_public_key

    load_public_key(args.pubkey)  # a bad key fails before any download
    if args.url:
        check_url(args.url)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{args.name}.raw"
    downloaded: str | None = None
    try:
        if args.url:
            fd, downloaded = tempfile.mkstemp(prefix=f".{args.name}.", suffix=".gz.tmp", dir=out_dir)
            with os.fdopen(fd, "w+b") as f:
                fetch(args.url, f, timeout=args.timeout, retries=args.retries, user_agent=f"{TOOL}/{__version__}")
            payload = downloaded
        else:
            payload = args.file
        with AtomicOutput(target, mode=0o644) as out:
            info = verify_and_extract(payload, args.pubkey, out.file, name=args.url or args.file)
    finally:
        if downloaded:
            try:
                os.unlink(downloaded)
            except FileNotFoundError:
                pass
    return f"{target}: verified {args.url or args.file}: {info.image_size} bytes, sha256 {info.image_sha256}"


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from overlaybd.update_payload import PayloadError

    try:
        print(_run(args))
    except PayloadError as e:
        print(f"{TOOL}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{TOOL}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{TOOL}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
