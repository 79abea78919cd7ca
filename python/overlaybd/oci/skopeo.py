"""Moving images between transports (`oci:DIR:NAME`, `docker://HOST/REPO:TAG`) with skopeo.

Why skopeo: the convertor and record-trace only transform OCI layouts on disk; pushing and pulling (auth,
mounts of existing blobs, retries) is left to a tool that already does it well.
"""

from __future__ import annotations

from ..host.command import HostError, run


class SkopeoError(RuntimeError):
    """skopeo failed; the message names source and destination and skopeo's own words."""


def skopeo_copy(src: str, dst: str, *, insecure: bool = False, skopeo: str = "skopeo") -> None:
    """Copy `src` to `dst` keeping digests; `insecure` allows plain HTTP / unverified TLS registries."""
    cmd = [skopeo, "copy", "--quiet", "--preserve-digests"]
    if insecure:
        cmd += ["--src-tls-verify=false", "--dest-tls-verify=false"]
    try:
        run([*cmd, src, dst], f"copy {src} to {dst}")
    except HostError as e:
        raise SkopeoError(str(e)) from e
