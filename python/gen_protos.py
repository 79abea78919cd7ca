"""Build step: generate gRPC/protobuf stubs for every .proto under python/overlaybd.

Stubs are build products (not committed): `make venv`/`make test`/`build.sh` run this.
Each foo.proto yields foo_pb2.py and its type stub foo_pb2.pyi (what mypy checks callers against),
+ foo_pb2_grpc.py when it declares a service, next to it; imports inside the stubs are made
package-relative.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent


def generate(proto: Path) -> None:
    out = proto.parent
    rc = protoc.main(
        ["protoc", f"-I{out}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", str(proto)]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed for {proto}")
    for stub in (out / (proto.stem + "_pb2.py"), out / (proto.stem + "_pb2.pyi"), out / (proto.stem + "_pb2_grpc.py")):
        if stub.exists():
            text = stub.read_text()
            text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
            stub.write_text(text)


def main() -> int:
    for proto in sorted((ROOT / "overlaybd").rglob("*.proto")):
        stubs = [proto.with_name(proto.stem + suffix) for suffix in ("_pb2.py", "_pb2.pyi")]
        if any(not s.exists() or s.stat().st_mtime < proto.stat().st_mtime for s in stubs):
            generate(proto)
            print(f"generated stubs for {proto.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
