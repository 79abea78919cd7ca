"""Registry mirrors (issue 13 item 4): hosts.toml and mirrorRegistry parsing, and a real site mirror.

The site mirror is Debian's docker-registry as a pull-through cache of an origin docker-registry, both on
127.0.0.1, with an access-logging proxy in front of the origin (mirror_env.py). Three nodes, each its own
process and cache, read the same blobs lazily through it; then the mirror is stopped, hangs, or answers
404, and reads fall back to the origin within the deadline without asking the bad mirror again per block.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from overlaybd.config.service import service_config_from_dict
from overlaybd.config.snapshotter import config_from_dict
from overlaybd.registry.hosts import HostResolver, MirrorSpec, mirror_specs_from_snapshotter, parse_hosts_toml

from .mirror_env import (
    AccessLogProxy,
    PullThroughMirror,
    expected_reads,
    finish_node,
    node_service,
    start_node,
    write_hosts_dir,
)

try:
    from helpers.registry import Registry, build_layout, need_tools
except ImportError:  # pragma: no cover
    from .conftest import Registry, build_layout  # type: ignore[no-redef,attr-defined]
    from .conftest import _need_tools as need_tools

# ---------------------------------------------------------------------------------------------- parsing


def test_hosts_toml_order_capabilities_and_paths() -> None:
    text = """
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:65001"]
  capabilities = ["pull", "resolve"]
  [host."http://127.0.0.1:65001".header]
    X-Dragonfly-Registry = ["https://registry-1.docker.io"]

[host."https://mirror.example/cache"]
  capabilities = ["pull"]
  skip_verify = true

[host."https://flat.example/api"]
  override_path = true
"""
    eps = parse_hosts_toml(text, "registry-1.docker.io", "https")
    assert [e.base for e in eps] == [
        "http://127.0.0.1:65001/v2",
        "https://mirror.example/cache/v2",
        "https://flat.example/api",
        "https://registry-1.docker.io/v2",
    ]
    assert eps[0].headers == ("X-Dragonfly-Registry: https://registry-1.docker.io",)
    assert eps[1].capabilities == {"pull"} and eps[1].skip_verify
    assert eps[2].capabilities == {"pull", "resolve", "push"}
    assert eps[-1].origin and not any(e.origin for e in eps[:-1])


def test_hosts_toml_errors_name_the_file() -> None:
    with pytest.raises(ValueError, match="x.toml"):
        parse_hosts_toml('[host."ftp://m"]\n', "r.example", "https", "x.toml")
    with pytest.raises(ValueError, match="x.toml"):
        parse_hosts_toml("server = \n", "r.example", "https", "x.toml")


def test_resolver_sources_in_order(tmp_path: Path) -> None:
    """mirrorRegistry mirrors first, then hosts.toml hosts, then the origin; docker.io's dir for Docker Hub;
    _default/ for registries without a directory; a mirror lacking the capability is skipped."""
    hd = tmp_path / "certs.d"
    (hd / "docker.io").mkdir(parents=True)
    (hd / "docker.io" / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n[host."http://hub-mirror:5000"]\n  capabilities = ["pull"]\n'
    )
    (hd / "_default").mkdir()
    (hd / "_default" / "hosts.toml").write_text('[host."http://site-mirror:5000"]\n')
    snap = tmp_path / "config.json"
    snap.write_text(
        json.dumps(
            {
                "mirrorRegistry": [
                    {"host": "r.example", "insecure": True},  # per-host settings only (upstream meaning)
                    {"host": "node-mirror:5000", "insecure": True, "mirrorOf": ["docker.io"]},
                    {"host": "all-mirror", "mirrorOf": ["*"]},
                ]
            }
        )
    )
    svc = service_config_from_dict(
        {"mirrorConfig": {"hostsDir": str(hd), "snapshotterConfig": str(snap), "retrySec": 5}}
    )
    res = HostResolver.from_service(svc)
    hub = [e.base for e in res.endpoints("registry-1.docker.io", "https")]
    assert hub == [
        "http://node-mirror:5000/v2",
        "https://all-mirror/v2",
        "http://hub-mirror:5000/v2",
        "https://registry-1.docker.io/v2",
    ]
    assert [e.base for e in res.endpoints("registry-1.docker.io", "https", "resolve")] == [
        "http://node-mirror:5000/v2",
        "https://all-mirror/v2",
        "https://registry-1.docker.io/v2",
    ]
    other = [e.base for e in res.endpoints("r.example", "http")]
    assert other == ["https://all-mirror/v2", "http://site-mirror:5000/v2", "http://r.example/v2"]
    # hold-off: the mirror is skipped until retrySec passed; the origin never is
    ep = res.endpoints("r.example", "http")[0]
    assert res.usable(ep, "a/b")
    res.hold(ep.base)
    assert not res.usable(ep, "a/b") and res.usable(res.endpoints("r.example", "http")[-1], "a/b")
    res.ok(ep.base)
    res.hold(f"{ep.base} a/b")
    assert not res.usable(ep, "a/b") and res.usable(ep, "c/d")


def test_mirror_registry_mirror_of_field() -> None:
    cfg = config_from_dict(
        {"mirrorRegistry": [{"host": "m:5000", "insecure": True, "mirrorOf": ["docker.io", "*"]}, {"host": "x"}]}
    )
    assert mirror_specs_from_snapshotter(cfg) == (MirrorSpec("m:5000", True, ("docker.io", "*")),)


def test_no_sources_means_origin_only(tmp_path: Path) -> None:
    res = HostResolver(str(tmp_path / "missing"), (), str(tmp_path / "missing.json"))
    assert [e.base for e in res.endpoints("r.example:5000", "https")] == ["https://r.example:5000/v2"]


# ---------------------------------------------------------------------------------------------- site mirror

MiB = 1 << 20
READS, LEN, SEED = 24, 64 << 10, 13


@pytest.fixture
def site(tmp_path: Path):
    """origin registry with two 6 MiB blobs, the access-log proxy, the pull-through mirror, a hosts dir."""
    need_tools()
    origin = Registry(tmp_path / "origin")
    proxy = AccessLogProxy(origin.port)
    mirror = PullThroughMirror(tmp_path / "mirror", f"http://{proxy.host}")
    blobs = []
    files = []
    for i in range(2):
        data = os.urandom(6 * MiB)
        f = tmp_path / f"blob{i}"
        f.write_bytes(data)
        files.append(f)
        blobs.append(data)
    layers = build_layout(tmp_path / "oci", "v1", files)
    origin.push(tmp_path / "oci", "v1", "library/app")
    # Everybody reaches the origin through the logging proxy (nodes too, when they fall back), so its log is
    # everything the origin served; to the nodes "the registry" is the proxy's address.
    hosts = write_hosts_dir(tmp_path / "certs.d", proxy.host, mirror.host)
    site = {
        "origin": origin,
        "proxy": proxy,
        "mirror": mirror,
        "hosts": hosts,
        "layers": layers,
        "pairs": list(zip(layers, blobs, strict=True)),
        "repo_url": f"http://{proxy.host}/v2/library/app/blobs",
        "tmp": tmp_path,
    }
    proxy.reset()  # the push went to the origin directly; count only what nodes cause
    yield site
    mirror.stop()
    proxy.close()
    origin.close()


def _run_nodes(site: dict, names: list[str], **svc: int) -> list[dict[str, str]]:
    procs = [
        start_node(
            node_service(site["tmp"] / name, site["hosts"], **svc), site["repo_url"], site["layers"], READS, LEN, SEED
        )
        for name in names
    ]
    return [finish_node(p) for p in procs]


@pytest.mark.registry
def test_three_nodes_share_one_origin_fetch(site: dict) -> None:
    """Node 1 warms the mirror; nodes 2 and 3 (concurrently) get every byte from the mirror alone.

    What the origin sends for node 1, per blob: the mirror's fill (one whole copy); the start of the
    whole-blob stream docker-registry answers a range request with while it fills, which node 1 hangs up on
    at its first byte (bounded by socket buffers); and the ranges node 1 reads from the origin meanwhile,
    each at most once."""
    want = expected_reads(site["pairs"], READS, LEN, SEED)
    proxy: AccessLogProxy = site["proxy"]
    sizes = {x["digest"]: x["size"] for x in site["layers"]}

    assert _run_nodes(site, ["node1"]) == [want]
    time.sleep(1.0)  # the mirror's background fill of what node 1 touched completes
    first = proxy.blob_bytes()
    assert _run_nodes(site, ["node2", "node3"]) == [want, want]
    later = proxy.blob_bytes() - first
    print(f"origin blob bytes: node1 {first}, nodes 2+3 {later}, blobs {sum(sizes.values())}")
    print(f"whole-blob GETs {proxy.whole_gets()}, re-sent {proxy.overlap()}")
    assert later == 0, "nodes 2 and 3 must be served by the mirror alone"
    # node 1's own range reads from the origin: no byte twice, except byte 0 of the open probe (`bytes=0-0`)
    assert all(v <= 1 for v in proxy.overlap(ranged_only=True).values()), proxy.overlap(ranged_only=True)
    for digest, gets in proxy.whole_gets().items():
        assert gets.count(sizes[digest]) == 1, (digest, gets)  # one complete fill per blob, the rest cut short
    assert all(a.method in ("GET", "HEAD") for a in proxy.log)


@pytest.mark.registry
def test_mirror_stopped_reads_fall_back_to_origin(site: dict) -> None:
    """Mirror down (connection refused): the right bytes from the origin; the dead mirror is asked once per
    retrySec, not once per block, so the reads take about as long as without a mirror."""
    site["mirror"].stop()
    want = expected_reads(site["pairs"], READS, LEN, SEED)
    t0 = time.monotonic()
    assert _run_nodes(site, ["n-down"], deadline=3) == [want]
    assert time.monotonic() - t0 < 30
    assert site["proxy"].blob_bytes() > 0  # served by the origin
    site["mirror"].start()  # and back: a fresh node goes through the mirror again
    site["proxy"].reset()
    assert _run_nodes(site, ["n-back"]) == [want]


@pytest.mark.registry
def test_hung_mirror_costs_one_timeout_not_one_per_block(site: dict, tmp_path: Path) -> None:
    """A mirror that accepts connections and never answers: the first read waits its share of the deadline,
    then the mirror is held off and every later read goes straight to the origin."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    hd = write_hosts_dir(tmp_path / "hung.d", site["proxy"].host, f"127.0.0.1:{hole.getsockname()[1]}")
    want = expected_reads(site["pairs"], READS, LEN, SEED)
    t0 = time.monotonic()
    p = start_node(
        node_service(tmp_path / "n-hung", hd, deadline=3), site["repo_url"], site["layers"], READS, LEN, SEED
    )
    assert finish_node(p) == want
    took = time.monotonic() - t0
    hole.close()
    # one mirror attempt of deadline/3 = 1 s (2 blobs: the hold is per host); without the hold it would be
    # READS * 2 of them
    assert took < 15, took


@pytest.mark.registry
def test_mirror_404_falls_over(site: dict, tmp_path: Path) -> None:
    """A mirror that does not have the repository (a pull-through cache of another origin: 404)."""
    other = Registry(tmp_path / "other")
    wrong = PullThroughMirror(tmp_path / "wrong-mirror", f"http://{other.host}")
    try:
        hd = write_hosts_dir(tmp_path / "wrong.d", site["proxy"].host, wrong.host)
        want = expected_reads(site["pairs"], READS, LEN, SEED)
        p = start_node(node_service(tmp_path / "n-404", hd), site["repo_url"], site["layers"], READS, LEN, SEED)
        assert finish_node(p) == want
    finally:
        wrong.stop()
        other.close()
