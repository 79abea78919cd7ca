"""Helpers for build.sh that are clearer in Python than in shell.

Subcommands (all print to stdout, exit non-zero with a message naming the file/field on error):
  tools                      names of the console tools (the TOOLS table) -> bin/ symlinks
  snapshotter-tools          names of the snapshotter/ tools (SNAPSHOTTER_TOOLS: ctr, convertor, ...)
  baselayer OUT EPOCH        the empty ext4 base layer (baselayers/ext4_64), reproducible from EPOCH
  extension-release ...      write usr/lib/extension-release.d/extension-release.<SYSEXT_ID>
  normalize ROOT EPOCH       fixed modes and mtimes so the image depends only on the inputs
  glibc-required DIR         highest GLIBC_x.y version needed by any ELF file under DIR
  glibc-check ...            compare that with the target Flatcar release's glibc (flatcar-glibc.tsv)
  listing ROOT               contents listing (mode owner size path) of the staged tree
  input-key REPO [ARGS...]   sha256 over every build input (the cache key the tests reuse builds by)
  gen-key PATH               new throwaway RSA-2048 payload key (PEM, 0600)
  check-key PATH             fail unless PATH is a usable RSA private key (>= 2048 bits)
  key-id PATH                sha256 of the key's public half (DER): names the key in the input key
  payload IMAGE OUT --key K  signed update payload (update_engine format) of IMAGE
  sha256sums DIR GLOB        DIR/SHA256SUMS over the files matching GLOB (systemd-sysupdate url-file)
  sysupdate-transfer --url U the systemd-sysupdate transfer file of the --sysext-level image
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSEXT_ID = "flatcar-overlaybd"
SYSUPDATE_ID = "overlaybd"
ARCHES = ("x86-64", "arm64")
ELF_MAGIC = b"\x7fELF"
GLIBC_RE = re.compile(rb"GLIBC_(\d+(?:\.\d+)+)")
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
# Inputs of the image: everything under these repo paths (plus build.sh) feeds the cache key.
INPUT_DIRS = ("python/overlaybd", "sysext", "units", "usr-etc", "butane")
INPUT_SUFFIXES = (".py", ".proto", ".json", ".spec", ".tsv", ".service", ".conf", ".j2", ".toml", ".yaml", ".sh")


class BuildError(Exception):
    """A build input is wrong; the message names the file and field."""


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def cmd_tools(_args: argparse.Namespace) -> None:
    from overlaybd.cli import TOOLS

    for name in sorted(TOOLS):
        print(name)


def cmd_snapshotter_tools(_args: argparse.Namespace) -> None:
    from overlaybd.cli import SNAPSHOTTER_TOOLS

    for name in sorted(SNAPSHOTTER_TOOLS):
        print(name)


def cmd_baselayer(args: argparse.Namespace) -> None:
    """Upstream's baselayers/ext4_64: mkfs timestamps from EPOCH (E2FSPROGS_FAKE_TIME) so the build reproduces."""
    import os

    from overlaybd.convert.baselayer import build_base_layer

    os.environ["E2FSPROGS_FAKE_TIME"] = str(int(args.epoch))
    build_base_layer(args.out)


def sysext_id(portable: bool) -> str:
    """Image name = extension-release suffix: Flatcar's official name, or `overlaybd` for the sysupdate route
    (the name of its /etc/extensions/overlaybd.raw link)."""
    return SYSUPDATE_ID if portable else SYSEXT_ID


def extension_release(flatcar_version: str | None, arch: str, portable: bool, sysext_version: str = "") -> str:
    """The extension-release body. Lockstep (VERSION_ID) unless `portable` (SYSEXT_LEVEL=1.0, any release)."""
    if arch not in ARCHES:
        raise BuildError(f"extension-release: ARCHITECTURE {arch!r} is not one of {ARCHES}")
    lines = ["ID=flatcar"]
    if portable:
        lines.append("SYSEXT_LEVEL=1.0")
    else:
        if not flatcar_version or not VERSION_RE.match(flatcar_version):
            raise BuildError(f"extension-release: VERSION_ID {flatcar_version!r} is not MAJOR.MINOR.PATCH")
        lines.append(f"VERSION_ID={flatcar_version}")
    lines += [f"ARCHITECTURE={arch}", "EXTENSION_RELOAD_MANAGER=1", f"SYSEXT_ID={sysext_id(portable)}"]
    if sysext_version:
        lines.append(f"SYSEXT_VERSION_ID={sysext_version}")
    return "\n".join(lines) + "\n"


def cmd_extension_release(args: argparse.Namespace) -> None:
    body = extension_release(args.flatcar_version, args.arch, args.portable, args.sysext_version or "")
    path = Path(args.root) / "usr/lib/extension-release.d" / f"extension-release.{sysext_id(args.portable)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(0o644)


def cmd_normalize(args: argparse.Namespace) -> None:
    """Dirs 0755, executables 0755, data 0644 (0600 kept: secrets templates), mtime = EPOCH everywhere."""
    root = Path(args.root)
    epoch = int(args.epoch)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                pass
            elif stat.S_ISDIR(st.st_mode):
                p.chmod(0o755)
            elif stat.S_ISREG(st.st_mode):
                mode = st.st_mode & 0o777
                if mode & 0o111:
                    p.chmod(0o755)
                elif mode & 0o077 == 0:
                    p.chmod(0o600)
                else:
                    p.chmod(0o644)
            else:
                raise BuildError(f"{p}: file type {stat.S_IFMT(st.st_mode):o} is not allowed in a sysext")
            os.utime(p, (epoch, epoch), follow_symlinks=False)
    root.chmod(0o755)
    os.utime(root, (epoch, epoch))


def elf_files(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                if f.read(4) == ELF_MAGIC:
                    out.append(p)
    return out


def glibc_required(root: Path) -> tuple[str, Path | None]:
    """Highest GLIBC_ symbol version referenced by the ELF files' version-needs (objdump -p)."""
    best: tuple[int, ...] = (0,)
    best_file: Path | None = None
    for p in elf_files(root):
        res = subprocess.run(["objdump", "-p", str(p)], capture_output=True, check=False)
        if res.returncode != 0:
            raise BuildError(f"{p}: objdump -p failed: {res.stderr.decode(errors='replace').strip()}")
        for m in GLIBC_RE.finditer(res.stdout):
            v = version_tuple(m.group(1).decode())
            if v > best:
                best, best_file = v, p
    return ".".join(map(str, best)), best_file


def target_glibc(flatcar_version: str, table: Path) -> str:
    """glibc of the Flatcar release: an exact version row wins over its major's row."""
    rows: dict[str, str] = {}
    for n, line in enumerate(table.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise BuildError(f"{table}:{n}: expected 'release glibc', got {line!r}")
        rows[parts[0]] = parts[1]
    for key in (flatcar_version, flatcar_version.split(".")[0]):
        if key in rows:
            return rows[key]
    raise BuildError(
        f"{table}: no glibc known for Flatcar {flatcar_version} (field 'release'); add a row or pass --target-glibc"
    )


def cmd_glibc_required(args: argparse.Namespace) -> None:
    ver, where = glibc_required(Path(args.dir))
    print(f"{ver}\t{where}")


def cmd_glibc_check(args: argparse.Namespace) -> None:
    need, where = glibc_required(Path(args.dir))
    have = args.target_glibc or target_glibc(args.flatcar_version, HERE / "flatcar-glibc.tsv")
    if version_tuple(need) > version_tuple(have):
        raise BuildError(
            f"{where}: requires GLIBC_{need} but Flatcar {args.flatcar_version} ships glibc {have}; "
            "build on an older host (glibc <= target)"
        )
    print(f"glibc: bundle needs >= {need} (max in {where.name if where else '-'}), target has {have}: OK")


def cmd_listing(args: argparse.Namespace) -> None:
    """Owner is printed as 0:0 because mkfs forces it (--all-root); modes and sizes are the staged ones."""
    root = Path(args.root)
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = "/" + str(p.relative_to(root))
        extra = f" -> {os.readlink(p)}" if stat.S_ISLNK(st.st_mode) else ""
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        print(f"{stat.filemode(st.st_mode)} 0:0 {size:>10} {rel}{extra}")


def input_key(repo: Path, extra: list[str]) -> str:
    """sha256 over file names+contents of every input, the build options and the interpreter version."""
    h = hashlib.sha256()
    files = [repo / "build.sh"]
    for d in INPUT_DIRS:
        files += [p for p in (repo / d).rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES]
    for p in sorted(set(files)):
        if "__pycache__" in p.parts or p.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        h.update(str(p.relative_to(repo)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    h.update(("\0".join(extra) + "\0" + sys.version).encode())
    return h.hexdigest()


def cmd_input_key(args: argparse.Namespace) -> None:
    print(input_key(Path(args.repo), args.extra))


def cmd_gen_key(args: argparse.Namespace) -> None:
    from overlaybd.update_payload import generate_key_pem

    fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(generate_key_pem())


def _private_key(path: str):  # type: ignore[no-untyped-def]
    from overlaybd.update_payload import PayloadError
    from overlaybd.update_payload.layout import load_private_key

    try:
        return load_private_key(path)
    except PayloadError as e:
        raise BuildError(str(e)) from None


def cmd_check_key(args: argparse.Namespace) -> None:
    print(f"{args.path}: RSA {_private_key(args.path).key_size} bits")


def cmd_key_id(args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives import serialization

    der = (
        _private_key(args.path)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    print(hashlib.sha256(der).hexdigest())


def cmd_payload(args: argparse.Namespace) -> None:
    """The update payload as Flatcar's delta_generator makes it; prints what the build log shows."""
    from overlaybd.update_payload import PayloadError, public_key_pem, write_payload

    try:
        res = write_payload(args.image, args.out, args.key)
        if args.pubkey_out:
            Path(args.pubkey_out).write_bytes(public_key_pem(args.key))
    except (PayloadError, ValueError) as e:
        raise BuildError(str(e)) from None
    print(
        f"{res.path}: {res.size} bytes, sha256 {res.sha256}; {res.replace_bz} REPLACE_BZ + {res.replace} REPLACE "
        f"operations for {res.image_size} image bytes (sha256 {res.image_sha256})"
    )


def sha256sums(directory: Path, pattern: str) -> str:
    """sha256sum(1) lines (`HEX  NAME`), sorted by name: the manifest systemd-sysupdate's url-file reads."""
    lines = []
    for p in sorted(directory.glob(pattern)):
        if p.is_file():
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n")
    if not lines:
        raise BuildError(f"{directory}: no file matches {pattern!r}")
    return "".join(lines)


def cmd_sha256sums(args: argparse.Namespace) -> None:
    out = Path(args.dir) / "SHA256SUMS"
    tmp = out.with_name(".SHA256SUMS.tmp")
    tmp.write_text(sha256sums(Path(args.dir), args.glob))
    tmp.replace(out)


def cmd_sysupdate_transfer(args: argparse.Namespace) -> None:
    from overlaybd.butane.render import ButaneVarError, sysupdate_transfer

    try:
        sys.stdout.write(sysupdate_transfer(args.url))
    except ButaneVarError as e:
        raise BuildError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="buildtool.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("tools").set_defaults(fn=cmd_tools)
    sub.add_parser("snapshotter-tools").set_defaults(fn=cmd_snapshotter_tools)
    p = sub.add_parser("baselayer")
    p.add_argument("out")
    p.add_argument("epoch")
    p.set_defaults(fn=cmd_baselayer)
    p = sub.add_parser("extension-release")
    p.add_argument("--root", required=True)
    p.add_argument("--flatcar-version")
    p.add_argument("--arch", required=True)
    p.add_argument("--portable", action="store_true")
    p.add_argument("--sysext-version")
    p.set_defaults(fn=cmd_extension_release)
    p = sub.add_parser("normalize")
    p.add_argument("root")
    p.add_argument("epoch")
    p.set_defaults(fn=cmd_normalize)
    p = sub.add_parser("glibc-required")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_glibc_required)
    p = sub.add_parser("glibc-check")
    p.add_argument("dir")
    p.add_argument("--flatcar-version", required=True)
    p.add_argument("--target-glibc")
    p.set_defaults(fn=cmd_glibc_check)
    p = sub.add_parser("listing")
    p.add_argument("root")
    p.set_defaults(fn=cmd_listing)
    p = sub.add_parser("input-key")
    p.add_argument("repo")
    p.add_argument("extra", nargs="*")
    p.set_defaults(fn=cmd_input_key)
    for name, fn in (("gen-key", cmd_gen_key), ("check-key", cmd_check_key), ("key-id", cmd_key_id)):
        p = sub.add_parser(name)
        p.add_argument("path")
        p.set_defaults(fn=fn)
    p = sub.add_parser("payload")
    p.add_argument("image")
    p.add_argument("out")
    p.add_argument("--key", required=True)
    p.add_argument("--pubkey-out")
    p.set_defaults(fn=cmd_payload)
    p = sub.add_parser("sha256sums")
    p.add_argument("dir")
    p.add_argument("glob")
    p.set_defaults(fn=cmd_sha256sums)
    p = sub.add_parser("sysupdate-transfer")
    p.add_argument("--url", required=True)
    p.set_defaults(fn=cmd_sysupdate_transfer)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except BuildError as e:
        print(f"buildtool: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
