"""The acceleration layer's format (oci/acceleration.py): the `trace` tar, reading it back, appending it to an
image of an OCI layout. record-trace end to end is tests/snapshotter/test_record_trace.py."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
from helpers.oci_images import busybox_layer, write_layout
from overlaybd.format.errors import FormatError
from overlaybd.format.trace import TraceRecord, write_trace
from overlaybd.oci import annotations as A
from overlaybd.oci.acceleration import append_acceleration_layer, build_acceleration_layer, read_acceleration_trace
from overlaybd.oci.layout import Layout, LayoutError


def test_acceleration_layer_round_trip(tmp_path):
    path = tmp_path / "trace"
    write_trace(path, [TraceRecord("R", 1, 4096, 8192)])
    blob = build_acceleration_layer(path.read_bytes())
    assert blob == build_acceleration_layer(path.read_bytes())  # reproducible
    assert read_acceleration_trace(blob, "accel") == path.read_bytes()


def test_acceleration_layer_bad_blobs():
    with pytest.raises(FormatError) as ei:
        read_acceleration_trace(b"not a tar at all" * 100, "reg/repo@sha256:x")
    assert ei.value.path == "reg/repo@sha256:x" and ei.value.field == "tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("other")
        tf.addfile(ti, io.BytesIO(b""))
        ti = tarfile.TarInfo("trace")
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
    with pytest.raises(FormatError) as ei:
        read_acceleration_trace(buf.getvalue(), "accel")
    assert ei.value.field == "trace" and "regular file" in str(ei.value)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.addfile(tarfile.TarInfo("other"), io.BytesIO(b""))
    with pytest.raises(FormatError) as ei:
        read_acceleration_trace(buf.getvalue(), "accel")
    assert ei.value.field == "trace" and "no `trace`" in str(ei.value)


def test_append_acceleration_layer(tmp_path):
    layout = tmp_path / "layout"
    write_layout(layout, "x:src", [busybox_layer()])
    digest = append_acceleration_layer(Layout(layout), "src", "accel", b"TRACE")
    idx = json.loads((layout / "index.json").read_text())
    entry = [m for m in idx["manifests"] if m["digest"] == digest][0]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "accel"
    manifest = json.loads((layout / "blobs/sha256" / digest[7:]).read_bytes())
    top = manifest["layers"][-1]
    assert top["annotations"][A.ACCELERATION_LAYER] == "yes"
    assert top["annotations"][A.BLOB_DIGEST] == top["digest"]
    assert top["annotations"][A.BLOB_SIZE] == str(top["size"])
    config = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())
    assert config["rootfs"]["diff_ids"][-1] == top["digest"]  # uncompressed: diff_id == digest
    blob = (layout / "blobs/sha256" / top["digest"][7:]).read_bytes()
    assert read_acceleration_trace(blob, "accel") == b"TRACE"
    # the rewritten image is what `skopeo copy oci:DIR:accel` finds; the source keeps its name
    assert Layout(layout).source("accel").manifest_digest == digest
    assert Layout(layout).source("src").manifest["layers"] == manifest["layers"][:-1]
    with pytest.raises(LayoutError, match="already has an acceleration layer"):
        append_acceleration_layer(Layout(layout), "accel", "accel2", b"TRACE")
    with pytest.raises(LayoutError, match="expected one image named 'missing'"):
        append_acceleration_layer(Layout(layout), "missing", "x", b"")
    assert os.path.exists(layout / "oci-layout")
