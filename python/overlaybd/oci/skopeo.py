"""Moving images between transports (`oci:DIR:NAME`, `docker://HOST/REPO:TAG`) with skopeo.

Why skopeo: the convertor and record-trace only transform OCI layouts on disk; pushing and pulling (auth,
mounts of existing blobs, retries) is left to a tool that already does it well.
"""

from __future__ import annotations

from ..host.command import HostError, run


class SkopeoError(RuntimeError):
    """skopeo failed; the message names source and destination and skopeo's own words."""


def skopeo_copy(
    src: str,
    dst: str,
    *,
    insecure: bool = False,
    creds: str | None = None,
    cert_dir: str | None = None,
    skopeo: str = "skopeo",
) -> None:
    """Copy `src` to `dst` keeping digests; `insecure` allows plain HTTP / unverified TLS registries.

    `creds` (`USER[:PASS]`) and `cert_dir` apply to whichever side is a registry (`docker://`).
    """
    cmd = [skopeo, "copy", "--quiet", "--preserve-digests"]
    if insecure:
        cmd += ["--src-tls-verify=false", "--dest-tls-verify=false"]
    for side, ref in (("src", src), ("dest", dst)):
        if ref.startswith("docker://"):
            if creds:
                cmd.append(f"--{side}-creds={creds}")
            if cert_dir:
                cmd.append(f"--{side}-cert-dir={cert_dir}")
    try:
        run([*cmd, src, dst], f"copy {src} to {dst}")
    except HostError as e:
        message = str(e)
        if creds:  # the failing command line is part of the message: never show the password
            user, sep, _ = creds.partition(":")
            message = message.replace(creds, f"{user}:***" if sep else user)
        raise SkopeoError(message) from None
