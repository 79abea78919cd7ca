"""Moving images between transports (`oci:DIR:NAME`, `docker://HOST/REPO:TAG`) with skopeo.

Why skopeo: the convertor and record-trace only transform OCI layouts on disk; pushing and pulling (auth,
mounts of existing blobs, retries) is left to a tool that already does it well.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from ..host.command import HostError, run
from .mediatypes import MT_OCI_MANIFEST


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


#: the `version` file of skopeo's `dir:` transport
DIR_VERSION = b"Directory Transport Version: 1.1\n"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def pull_to_layout(ref: str, layout_dir: str, name: str, work: str, **kw: Any) -> None:
    """Fetch `docker://` image `ref` unchanged into the OCI layout `layout_dir`, tagged `name`.

    Why through skopeo's `dir:` transport: an `oci:` destination only takes OCI manifests, so a Docker v2
    image would be converted (and its digests changed, which --preserve-digests refuses); `dir:` keeps
    the manifest, config and layers byte for byte, whatever their media types.
    """
    from .layout import Layout

    d = os.path.join(work, "pull.dir")
    skopeo_copy(ref, f"dir:{d}", **kw)
    layout = Layout(layout_dir)
    layout.init()
    for entry in os.listdir(d):
        if len(entry) == 64 and all(c in "0123456789abcdef" for c in entry):
            target = layout.blob_path("sha256:" + entry)
            if not target.exists():
                _link_or_copy(os.path.join(d, entry), str(target))
    with open(os.path.join(d, "manifest.json"), "rb") as f:
        body = f.read()
    media_type = json.loads(body).get("mediaType") or MT_OCI_MANIFEST
    digest, size = layout.put_bytes(body)
    layout.tag(name, digest, size, media_type)
    shutil.rmtree(d, ignore_errors=True)


def push_from_layout(layout_dir: str, name: str, ref: str, work: str, **kw: Any) -> None:
    """Push image `name` of an OCI layout to `docker://` `ref` keeping its digests and media types (Docker v2
    manifests included, which skopeo's `oci:` source does not list), through a `dir:` copy of it."""
    from .layout import Layout

    layout = Layout(layout_dir)
    image = layout.source(name)
    d = os.path.join(work, "push.dir")
    os.makedirs(d, exist_ok=True)
    for desc in [image.manifest["config"], *image.manifest.get("layers", [])]:
        _link_or_copy(str(layout.blob_path(desc["digest"])), os.path.join(d, desc["digest"].removeprefix("sha256:")))
    shutil.copyfile(layout.blob_path(image.manifest_digest), os.path.join(d, "manifest.json"))
    with open(os.path.join(d, "version"), "wb") as f:
        f.write(DIR_VERSION)
    try:
        skopeo_copy(f"dir:{d}", ref, **kw)
    finally:
        shutil.rmtree(d, ignore_errors=True)
