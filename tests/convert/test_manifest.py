"""Manifest fidelity of overlaybd-convert: layer UUIDs from chain IDs, history kept, upstream media types."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.oci_images import busybox_layer, files_layer, write_layout
from overlaybd.cli.convert import main as convert_main
from overlaybd.host.progress import CountingReader, Progress, human_bytes
from overlaybd.oci.identity import chain_id_uuid, chain_ids
from overlaybd.oci.layout import Layout

HISTORY = [
    {"created": "2024-01-01T00:00:00Z", "created_by": "ADD rootfs.tar /"},
    {"created": "2024-01-01T00:00:01Z", "created_by": "ENV A=b", "empty_layer": True},
    {"created": "2024-01-01T00:00:02Z", "created_by": "COPY added /etc/added"},
]


def _source(tmp_path: Path) -> tuple[Path, list[str]]:
    """A two-layer source layout whose config carries a history (with an empty_layer entry)."""
    src = tmp_path / "src"
    layers = [busybox_layer(), files_layer({"etc/added": b"added\n"})]
    write_layout(src, "localhost/t/h:1", layers)
    lay = Layout(src)
    img = lay.source()
    config = {**img.config, "history": HISTORY}
    cdigest, csize = lay.put_bytes(json.dumps(config).encode())
    manifest = {**img.manifest, "config": {**img.manifest["config"], "digest": cdigest, "size": csize}}
    mdigest, msize = lay.put_bytes(json.dumps(manifest).encode())
    lay.tag("localhost/t/h:1", mdigest, msize, manifest["mediaType"])
    return src, ["sha256:" + hashlib.sha256(raw).hexdigest() for raw in layers]


def _convert(tmp_path: Path, *flags: str) -> Layout:
    src, _ = _source(tmp_path)
    dst = tmp_path / ("dst" + "".join(flags).replace("-", "_"))
    args = [f"oci:{src}", f"oci:{dst}:obd", "--vsize", "1", "--work-dir", str(tmp_path / "work"), *flags]
    assert convert_main(args) == 0
    return Layout(dst)


def _header(layout: Layout, digest: str) -> tuple[str, str]:
    info_tool = Path(sys.executable).parent / "overlaybd-info"
    info = json.loads(subprocess.run([info_tool, layout.blob_path(digest)], capture_output=True, check=True).stdout)
    h = info["lsmt"]["header"]
    return h["uuid"], h["parent_uuid"]


def test_chain_id_uuid_is_first_128_bits() -> None:
    chain = "sha256:" + "0123456789abcdef" * 4
    assert chain_id_uuid(chain) == "01234567-89AB-CDEF-0123-456789ABCDEF"
    with pytest.raises(ValueError):
        chain_id_uuid("sha512:abc")
    d0, d1 = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert chain_ids([d0, d1]) == [d0, "sha256:" + hashlib.sha256(f"{d0} {d1}".encode()).hexdigest()]


def test_uuids_history_and_docker_media_types(tmp_path: Path) -> None:
    out = _convert(tmp_path, "--docker")
    _, diff_ids = _source(tmp_path / "again")
    img = out.source("obd")
    assert img.manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert img.manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert {ly["mediaType"] for ly in img.manifest["layers"]} == {"application/vnd.docker.image.rootfs.diff.tar"}
    assert img.config["history"] == HISTORY  # one non-empty entry per layer, as before
    uuids = [chain_id_uuid(c) for c in chain_ids(diff_ids)]
    headers = [_header(out, ly["digest"]) for ly in img.manifest["layers"]]
    assert [h[0] for h in headers] == uuids
    assert headers[1][1] == uuids[0]
    assert headers[0][1] == "00000000-0000-0000-0000-000000000000"


def test_layout_destination_defaults_to_oci(tmp_path: Path) -> None:
    """An oci: layout indexes OCI manifests only (skopeo cannot read a Docker v2 one from it): OCI by default."""
    img = _convert(tmp_path).source("obd")
    assert img.manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    res = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{tmp_path / 'dst'}:obd"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_oci_flag_and_old_spelling(tmp_path: Path) -> None:
    img = _convert(tmp_path, "--oci").source("obd")
    assert img.manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert img.manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert {ly["mediaType"] for ly in img.manifest["layers"]} == {"application/vnd.oci.image.layer.v1.tar"}
    docker = _convert(tmp_path, "--docker").source("obd")
    assert docker.manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"


def test_oci_and_docker_exclude_each_other(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        convert_main([f"oci:{tmp_path}", f"oci:{tmp_path}/d:x", "--oci", "--docker"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_diff_ids_mismatch_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    write_layout(src, "localhost/t/m:1", [busybox_layer()])
    lay = Layout(src)
    img = lay.source()
    config = {**img.config, "rootfs": {"type": "layers", "diff_ids": []}}
    cdigest, csize = lay.put_bytes(json.dumps(config).encode())
    manifest = {**img.manifest, "config": {**img.manifest["config"], "digest": cdigest, "size": csize}}
    mdigest, msize = lay.put_bytes(json.dumps(manifest).encode())
    lay.tag("localhost/t/m:1", mdigest, msize, manifest["mediaType"])
    assert convert_main([f"oci:{src}", f"oci:{tmp_path}/dst:x", "--work-dir", str(tmp_path / "w")]) == 1
    assert "diff_ids lists 0 layers but the manifest has 1" in capsys.readouterr().err


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    tty = _Tty()
    with Progress("convert", stream=tty, interval=0) as p:
        p.stage("layer 1 of 2")
        p.step("apply", 4 << 20)
        data = CountingReader(io.BytesIO(b"x" * (2 << 20)), p).read()
        assert len(data) == 2 << 20
    out = tty.getvalue()
    assert "\rconvert:  layer 1 of 2: apply  2.0 MiB / 4.0 MiB (50%)" in out and "/s" in out
    assert out.endswith("\n")
    pipe = io.StringIO()  # not a terminal: nothing at all
    with Progress("convert", stream=pipe) as p:
        p.stage("layer 1 of 1")
        p.advance(100)
    assert pipe.getvalue() == ""
    monkeypatch.setenv("TERM", "dumb")
    assert not Progress("x", stream=_Tty()).enabled
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(10) == "10 B"


@pytest.mark.root  # FUSE mount + loop device
def test_base_layer_instead_of_mkfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convertor --mkfs=false: layers stacked on the prebuilt empty ext4 (reproducible), shipped as layer 0."""
    from overlaybd.convert.baselayer import build_base_layer
    from overlaybd.convert.convertor import BASE_LAYER_HISTORY, Options, convert_layout

    monkeypatch.setenv("E2FSPROGS_FAKE_TIME", "1700000000")
    base, again = tmp_path / "ext4_64", tmp_path / "again"
    build_base_layer(str(base))
    build_base_layer(str(again))
    assert base.read_bytes() == again.read_bytes() and base.stat().st_size < 4 << 20
    src, diff_ids = _source(tmp_path)
    out = Layout(tmp_path / "dst")
    opts = Options(vsize_gb=64, base_layer=str(base))
    convert_layout(Layout(src), out, "obd", opts=opts, work_dir=str(tmp_path / "work"))
    img = out.source("obd")
    assert len(img.manifest["layers"]) == 3 and img.config["history"] == [BASE_LAYER_HISTORY, *HISTORY]
    assert img.config["rootfs"]["diff_ids"] == [ly["digest"] for ly in img.manifest["layers"]]
    uuids = [chain_id_uuid(c) for c in chain_ids(diff_ids)]
    assert [_header(out, ly["digest"])[0] for ly in img.manifest["layers"][1:]] == uuids
    cfg = tmp_path / "ro.json"
    cfg.write_text(
        json.dumps({"lowers": [{"file": str(out.blob_path(ly["digest"]))} for ly in img.manifest["layers"]]})
    )
    dump = Path(sys.executable).parent / "overlaybd-dump"
    subprocess.run([dump, cfg, tmp_path / "disk.img"], check=True, capture_output=True)
    r = subprocess.run(["debugfs", "-R", "cat /etc/added", tmp_path / "disk.img"], capture_output=True, check=True)
    assert r.stdout == b"added\n"
