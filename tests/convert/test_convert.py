"""overlaybd-convert: OCI layout -> overlaybd layout; the result is mounted through the FUSE frontend
and must show the merged tree (whiteouts applied)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile

import pytest
from helpers.oci_images import busybox_layer, files_layer, write_layout
from overlaybd.cli.convert import main as convert_main
from overlaybd.convert.extract import LayerError, apply_layer
from overlaybd.oci.layout import Layout

PFX = "containerd.io/snapshot/overlaybd/"


def _layers(tmp_path):
    base = busybox_layer()
    second = files_layer(
        {"etc/added": b"added\n", "bin/script": b"#!/bin/sh\necho hi\n"}, whiteouts=("etc/os-release",)
    )
    return [base, second]


pytestmark = pytest.mark.root  # the convertor mkfs's through FUSE + loop; the result is mounted


@pytest.fixture
def converted(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_layout(src, "localhost/t/bb:1", _layers(tmp_path))
    rc = convert_main([f"oci:{src}", f"oci:{dst}:obd", "--vsize", "1", "--work-dir", str(tmp_path)])
    assert rc == 0
    return Layout(dst)


def test_manifest_and_annotations(converted):
    img = converted.source("obd")
    layers = img.manifest["layers"]
    assert len(layers) == 2
    for ly in layers:
        assert ly["mediaType"] == "application/vnd.oci.image.layer.v1.tar"  # oci: layout destination: OCI
        a = ly["annotations"]
        assert a[PFX + "version"] == "0.1.0" and a[PFX + "blob-digest"] == ly["digest"]
        assert a[PFX + "blob-size"] == str(ly["size"]) and a[PFX + "blob-fs-type"] == "ext4"
        blob = converted.blob_path(ly["digest"]).read_bytes()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == ly["digest"]
        assert blob[257:262] == b"ustar" and blob[1024:1040] == b"overlaybd.commit"  # pax hdr, record, entry
    assert img.config["rootfs"]["diff_ids"] == [ly["digest"] for ly in layers]


def test_content_through_fuse(converted, tmp_path):
    from overlaybd.fuse.file_device import FileDevice
    from overlaybd.image import open_image

    img = converted.source("obd")
    cfg = {
        "lowers": [{"file": str(converted.blob_path(ly["digest"]))} for ly in img.manifest["layers"]],
        "resultFile": str(tmp_path / "res"),
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    image = open_image(str(tmp_path / "c.json"))
    dev = FileDevice(image, str(tmp_path / "run" / "convtest.img"), read_only=True)
    loopdev = dev.start()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "ext4", "-o", "ro,noload", loopdev, str(mnt)], check=True)
        try:
            assert (mnt / "etc/added").read_text() == "added\n"
            assert not (mnt / "etc/os-release").exists()  # whiteout applied
            assert (mnt / "bin/busybox").stat().st_mode & 0o111
            assert (mnt / "bin/sh").is_symlink() and (mnt / "bin/sh").readlink().name == "busybox"
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        dev.stop()
        image.close()


def _tar(entries):
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind, link in entries:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.linkname = link
            tf.addfile(ti, io.BytesIO(b""))
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    "entries",
    [
        [("../evil", tarfile.REGTYPE, "")],
        [("h", tarfile.LNKTYPE, "../../etc/passwd")],
    ],
)
def test_extract_rejects_escapes(tmp_path, entries):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(LayerError) as ei:
        apply_layer(_tar(entries), str(root), "bad.tar")
    assert "bad.tar" in str(ei.value)
    assert not (tmp_path / "evil").exists()


def test_extract_opaque_and_replace(tmp_path):
    root = tmp_path / "root"
    (root / "d/sub").mkdir(parents=True)
    (root / "d/old").write_text("x")
    (root / "f").mkdir()
    apply_layer(_tar([("d/.wh..wh..opq", tarfile.REGTYPE, ""), ("f", tarfile.REGTYPE, "")]), str(root))
    assert list((root / "d").iterdir()) == []
    assert (root / "f").is_file()


def test_bad_source_layout(tmp_path):
    (tmp_path / "src").mkdir()
    rc = convert_main([f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}:x"])
    assert rc == 1
