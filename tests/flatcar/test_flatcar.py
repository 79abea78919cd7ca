"""The systemd guest tier (`pytest -m flatcar`): the flatcar-overlaybd extension as a Flatcar machine gets it.

A Debian 13 guest (systemd 257, glibc 2.41, os-release faked as Flatcar) is provisioned by the real
butane + ignition, boots with `enabled-sysext.conf: overlaybd`, fetches the signed payload for its
release from an in-guest release server before systemd-sysext runs, updates in lockstep to the next
release, and runs a lazily pulled overlaybd container on a TCMU device. See harness.py for the boots.
"""

from __future__ import annotations

import re

import pytest

from . import harness

pytestmark = pytest.mark.flatcar


def assert_checks(res: harness.Results, names: list[str]) -> None:
    """Every named check ran in the guest and passed; otherwise show its log and the boot's context."""
    for name in names:
        status = res.checks.get(name)
        assert status == "ok", f"{name}: {status or 'did not run'}\n{res.detail(name)}"


def test_butane_through_real_tools(flatcar: harness.Results) -> None:
    """butane --strict accepted overlaybd-butane's config and ignition wrote exactly what it asked for."""
    prov = flatcar.provisioning
    assert prov.ignition["ignition"]["version"] == "3.3.0"
    for path, content in prov.files.items():
        assert flatcar.staged_files.get(path) == content, f"ignition wrote {path} differently"
    assert b"overlaybd" in prov.files["/etc/flatcar/enabled-sysext.conf"]
    assert b"[proxy_plugins.overlaybd]" in prov.files["/etc/containerd/config.toml"]


def test_a_first_boot_fetches_and_merges(flatcar: harness.Results) -> None:
    """First boot: the setup step downloads and links the image for this release before systemd-sysext;
    merged, /etc populated, both daemons upheld and never restarted."""
    assert_checks(
        flatcar, ["a_setup_before_sysext", "a_stored_and_linked", "a_merged", "a_etc_populated", "a_daemons_upheld"]
    )


def test_b_lockstep_update(flatcar: harness.Results) -> None:
    """The update's postinstall fails without a payload for the next release, then fetches it and prunes
    older images; after the reboot the next release's image is linked and merged."""
    assert_checks(
        flatcar,
        [
            "b_update_without_payload_fails",
            "b_update_fetches_next",
            "b_booted_next",
            "b_next_linked",
            "b_next_merged",
            "b_next_daemons",
        ],
    )
    log = flatcar.logs["b_update_without_payload_fails"]
    assert "Failed to download required extension payload" in log, log


def test_b_wrong_release_refused_and_containerd_fails_fast(flatcar: harness.Results) -> None:
    """An image for another release is not merged; containerd, configured for the proxy plugin, answers
    at once with an error that names the snapshotter's socket instead of hanging."""
    assert_checks(flatcar, ["b_wrong_version_refused", "b_containerd_fails_fast"])
    boot = flatcar.files / "boot3"
    for what in ("run", "prepare"):
        ms = int((boot / f"ctr-{what}-ms.txt").read_text())
        err = (boot / f"ctr-{what}-error.txt").read_text()
        assert ms < 10_000, f"ctr {what} took {ms} ms to fail: {err}"
        assert "overlaybd" in err and ("overlaybd.sock" in err or "snapshotter" in err), err


def test_c_provisioned_containerd_runs_lazy_container(flatcar: harness.Results) -> None:
    """containerd runs with the Butane config.toml; rpull + ctr run start a container whose rootfs is a
    TCMU device, authenticated by the Butane cred.json, fetching only a small part of the layer."""
    assert_checks(flatcar, ["c_containerd_config", "c_rpull", "c_run", "c_rootfs_on_tcmu"])
    log = (flatcar.files / "boot1" / "registry.log").read_text(errors="replace")
    fetched = layer_bytes_served(log, flatcar.layers)
    total = sum(flatcar.layers.values())
    assert 0 < fetched < total * 0.3, f"{fetched} of {total} layer bytes fetched:\n{log[-3000:]}"
    assert re.search(r'"GET /v2/obd/hello/blobs/sha256:[0-9a-f]+ HTTP/1.1" 401', log) or "401" in log, (
        "the registry never asked for credentials"
    )


def test_d_runtime_merge_starts_daemons_once(flatcar: harness.Results) -> None:
    """The right image added after boot + `systemd-sysext refresh`: both daemons up, no restart loop."""
    assert_checks(flatcar, ["d_runtime_merge", "d_run_after_merge"])


def test_e_reboot_keeps_cache_and_snapshots(flatcar: harness.Results) -> None:
    """After a reboot the block cache and the snapshot metadata are intact and the same container runs
    again without a single blob request to the registry."""
    assert_checks(flatcar, ["e_state_survived", "e_run_again_without_fetch"])


def layer_bytes_served(access_log: str, layers: dict[str, int]) -> int:
    """Bytes the registry sent for the image's layer blobs (combined log format: '"GET URI" STATUS BYTES')."""
    total = 0
    for m in re.finditer(r'"GET /v2/[^ ]*/blobs/(sha256:[0-9a-f]{64}) HTTP/[0-9.]+" (\d{3}) (\d+)', access_log):
        if m.group(1) in layers and m.group(2) in ("200", "206"):
            total += int(m.group(3))
    return total


def test_sysupdate_route_updates_and_merges(flatcar: harness.Results) -> None:
    """Item 3's route: the SYSEXT_LEVEL image set up as Butane's delivery=sysupdate does, systemd-sysupdate
    fetches the newer version from the in-guest server, and after a reboot that one is merged and runs."""
    assert_checks(flatcar, ["sysupdate_update", "sysupdate_merged", "sysupdate_run"])
