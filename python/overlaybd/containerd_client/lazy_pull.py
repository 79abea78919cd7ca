"""rpull: register an overlaybd image in containerd without downloading its layers.

Why it exists: `ctr pull` cannot pass the image reference to the snapshotter, so layers would be
downloaded and unpacked. rpull does what containerd's pull does, minus the layer data: it stores
the manifest and config in containerd's content store (under a lease, with the GC reference
labels containerd's own pull sets), asks containerd's snapshot service to Prepare every layer
with the overlaybd labels plus `containerd.io/snapshot/image-ref` — which the overlaybd
snapshotter answers with AlreadyExists after creating a lazy layer — and finally creates the
image record. `ctr run --snapshotter=overlaybd IMAGE` then finds the image unpacked.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import grpc

from ..containerd_api import content_images_leases_pb2 as api
from ..oci import annotations as A
from ..oci.identity import chain_ids
from ..registry.credentials import Credential
from .services import Containerd

log = logging.getLogger(__name__)


class RpullError(RuntimeError):
    """rpull failed; the message says which step and which layer/blob."""


@dataclass
class Layer:
    digest: str
    size: int
    diff_id: str
    chain_id: str
    annotations: dict[str, str]


def _layers(manifest: dict[str, Any], config: dict[str, Any]) -> list[Layer]:
    descs = manifest.get("layers", [])
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(descs) != len(diff_ids):
        raise RpullError(f"image config lists {len(diff_ids)} diff_ids but the manifest has {len(descs)} layers")
    chains = chain_ids(diff_ids)
    out = []
    for i, d in enumerate(descs):
        ann = {k: v for k, v in (d.get("annotations") or {}).items() if k.startswith(A.SNAPSHOT_PREFIX)}
        if not A.is_overlaybd_layer(ann):
            raise RpullError(
                f"layer {i} ({d.get('digest')}) is not an overlaybd layer (no {A.BLOB_DIGEST} "
                "annotation); pull it with `ctr pull` instead"
            )
        out.append(Layer(d["digest"], int(d.get("size", 0)), diff_ids[i], chains[i], ann))
    return out


class UserCredential:
    """`-u USER:PASS` for one registry host, looked up before the configured source (as ctr's --user)."""

    def __init__(self, host: str, credential: Credential, fallback: Any) -> None:
        self.host, self.credential, self.fallback = host, credential, fallback

    def lookup(self, url: str) -> Credential | None:
        if urlsplit(url).netloc == self.host:
            return self.credential
        return self.fallback.lookup(url)


def rpull(
    ref: str,
    address: str,
    *,
    namespace: str = "default",
    snapshotter: str = "overlaybd",
    plain_http: bool = False,
    registry: Any = None,
    service: Any = None,
    credential: tuple[str, str] | None = None,
) -> str:
    """Make `ref` runnable with `--snapshotter=snapshotter` without fetching layers; returns the top chainID.

    Registry credentials come from `service`'s `credentialConfig` (overlaybd.json, as the daemons read them);
    `credential` (`-u USER:PASS`) takes precedence for the image's registry.
    """
    from ..registry.client import RegistryClient, RegistryError
    from ..registry.image_ref import ReferenceError, parse_reference

    try:
        r = parse_reference(ref)
    except ReferenceError as e:
        raise RpullError(str(e)) from e
    scheme = "http" if plain_http else "https"
    client = registry or RegistryClient(service)
    if credential is not None:
        client.credentials = UserCredential(r.registry, Credential(*credential), client.credentials)
    try:
        m = client.get_manifest(r, scheme=scheme)
        config_body = client.get_blob(r, m.config["digest"], scheme=scheme)
    except (RegistryError, OSError) as e:
        raise RpullError(f"{ref}: cannot fetch manifest/config: {e}") from e
    config = json.loads(config_body)
    layers = _layers(m.doc, config)
    top = layers[-1].chain_id if layers else ""

    cd = Containerd(address, namespace)
    try:
        cd.create_lease(timedelta(hours=1))
        source = {f"containerd.io/distribution.source.{r.registry}": r.repository}
        cd.write_content(
            config_body,
            m.config["digest"],
            {**source, f"containerd.io/gc.ref.snapshot.{snapshotter}": top} if top else source,
        )
        mlabels = {**source, "containerd.io/gc.ref.content.config": m.config["digest"]}
        cd.write_content(m.body, m.digest, mlabels)
        parent = ""
        for i, ly in enumerate(layers):
            if not cd.snapshot_exists(snapshotter, ly.chain_id):
                _prepare_remote(cd, snapshotter, ref, ly, parent, i)
            parent = ly.chain_id
        cd.put_image(str(ref), api.Descriptor(media_type=m.media_type, digest=m.digest, size=len(m.body)))
    except grpc.RpcError as e:
        raise RpullError(f"{ref}: containerd at {address}: {e.code().name}: {e.details()}") from e
    finally:
        try:
            cd.delete_lease()
        except grpc.RpcError as e:
            log.warning("delete lease: %s", e.details())
        cd.close()
    return top


def _prepare_remote(cd: Containerd, snapshotter: str, ref: str, ly: Layer, parent: str, index: int) -> None:
    labels = {
        **ly.annotations,
        A.TARGET_SNAPSHOT_REF: ly.chain_id,
        A.TARGET_IMAGE_REF: ref,
        A.DIFF_ID: ly.diff_id,
    }
    if parent:
        labels[A.PARENT_CHAIN_ID] = parent
    key = f"extract-{time.time_ns()}-{secrets.token_hex(3)} {ly.chain_id}"
    try:
        cd.prepare(snapshotter, key, parent, labels)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.ALREADY_EXISTS:
            log.info("layer %d %s: remote snapshot %s ready", index, ly.digest, ly.chain_id)
            return
        raise RpullError(f"layer {index} ({ly.digest}): Prepare: {e.code().name}: {e.details()}") from e
    cd.remove_snapshot(snapshotter, key)  # the snapshotter made a plain (downloadable) snapshot instead
    raise RpullError(
        f"layer {index} ({ly.digest}): snapshotter {snapshotter!r} did not take the layer as a "
        "remote overlaybd layer (is it the overlaybd snapshotter?)"
    )
