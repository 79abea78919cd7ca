"""Registry mirrors (issue 13 item 4): hosts.toml and mirrorRegistry parsing, and a real site mirror.

The site mirror is Debian's docker-registry as a pull-through cache of an origin docker-registry, both on
127.0.0.1, with an access-logging proxy in front of the origin (mirror_env.py). Three nodes, each its own
process and cache, read the same blobs lazily through the cold mirror, together or one first: the origin
serves no range and each blob once, whole (plus docker-registry's cut-short streams). Then the mirror is
stopped, hangs, or answers 404, and reads fall back to the origin within the deadline without asking the bad
mirror again per block.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers.registry import LoopbackHTTP, Registry, need_tools
from overlaybd.config.service import service_config_from_dict
from overlaybd.config.snapshotter import config_from_dict
from overlaybd.registry.client import FILL_MARGIN, FILL_POLL, FILL_POLL_MAX, MIRROR_SHARE, RegistryClient
from overlaybd.registry.hosts import HostResolver, MirrorSpec, mirror_specs_from_snapshotter, parse_hosts_toml
from overlaybd.registry.image_ref import BlobLocation

from .mirror_env import (
    AccessLogProxy,
    PullThroughMirror,
    expected_reads,
    finish_node,
    mirror_site,
    node_service,
    start_node,
    write_hosts_dir,
)

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
BLOB_MIB = 24


@pytest.fixture
def site(tmp_path: Path):
    """origin registry with two BLOB_MIB MiB blobs, the access-log proxy, the pull-through mirror, a hosts dir."""
    need_tools()
    with mirror_site(
        tmp_path, lambda origin: PullThroughMirror(tmp_path / "mirror", f"http://{origin}"), BLOB_MIB
    ) as s:
        yield s


def _run_nodes(site: dict, names: list[str], **svc: int) -> list[dict[str, str]]:
    procs = [
        start_node(
            node_service(site["tmp"] / name, site["hosts"], **svc), site["repo_url"], site["layers"], READS, LEN, SEED
        )
        for name in names
    ]
    return [finish_node(p) for p in procs]


# A whole-blob GET the origin answers for one of the mirror's copyContent streams, which the node hangs up on at
# its first byte, sends what TCP had in flight on the two hops (origin -> mirror -> node) by the time the mirror
# noticed: autotuned send buffers of up to tcp_wmem's maximum (4 MiB here) on each hop, plus receive windows.
# Measured on loopback: 0.2 to 10 MiB per stream. Blobs are larger than this bound, so a cut-short stream is
# never mistaken for a complete one.
CUT_SHORT_MAX = 16 * MiB
NODE_DEADLINE = 10  # node_service's readDeadlineSec


def _max_filling_answers(deadline: float) -> int:
    """The most 200 answers a node can get for one blob while it waits for the mirror's fill: its first
    request, then one per poll (the client's schedule; request times only make it fewer)."""
    share = deadline * MIRROR_SHARE
    margin = min(1.0, share * FILL_MARGIN)
    t, delay, n = 0.0, FILL_POLL, 1
    while (pause := min(delay, share - margin - t)) > 0:
        t, delay, n = t + pause, min(delay * 2, FILL_POLL_MAX), n + 1
    return n


def _cold_mirror_run(site: dict, waves: list[list[str]], logs: list[str]) -> list[tuple[int, dict[str, int]]]:
    """Run the waves of nodes (each wave's nodes concurrently, separate processes and caches) on the cold
    mirror; check the bytes every node read. Per wave: (origin blob bytes of the requests that reached the
    origin while it ran, its nodes' 200 answers per blob, summed). `logs` gets the nodes' logs."""
    want = expected_reads(site["pairs"], READS, LEN, SEED)
    proxy: AccessLogProxy = site["proxy"]
    out = []
    for wave in waves:
        t0 = time.monotonic()
        filling: dict[str, int] = {}
        per_node = []
        procs = [
            start_node(
                node_service(site["tmp"] / n, site["hosts"], deadline=NODE_DEADLINE),
                site["repo_url"],
                site["layers"],
                READS,
                LEN,
                SEED,
            )
            for n in wave
        ]
        for p in procs:
            mine: dict[str, int] = {}
            assert finish_node(p, filling=mine, logs=logs) == want  # every node read the right bytes
            per_node.append(mine)
            for d, k in mine.items():
                filling[d] = filling.get(d, 0) + k
        # each node waited for the fill alone (one poller per blob in a process), within its schedule
        bound = _max_filling_answers(NODE_DEADLINE)
        assert all(k <= bound for mine in per_node for k in mine.values()), (per_node, bound)
        out.append((proxy.blob_bytes(since=t0), filling))
    return out


def _check_origin(site: dict, filling: dict[str, int], logs: list[str]) -> None:
    """What the origin served for a cold mirror and any number of nodes: no range request; per blob one
    complete GET (the mirror's fill), otherwise cut-short streams, each at most CUT_SHORT_MAX and at most one
    per 200 answer the nodes got (a node's first request of the blob, and its polls).

    docker-registry 2.8 can fetch a blob completely a second time: a request that finds the blob not stored
    yet, then (after a ping of the origin) no fill in flight any more because it has just been stored, starts
    a new one. Such a refetch is counted separately: it can only begin after the previous complete fill ended,
    and it comes with a 200 answer to the request that started it."""
    proxy: AccessLogProxy = site["proxy"]
    sizes = {x["digest"]: x["size"] for x in site["layers"]}
    ranged = proxy.ranged_blob_gets()
    assert not ranged, f"the origin was asked for ranges: {ranged[:5]}; node logs:\n" + "\n".join(logs)
    cut_short, bound, refetched = 0, 0, {}
    for digest, size in sizes.items():
        gets = proxy.whole_get_log().get(digest, [])
        fills = [a for a in gets if a.sent == size]
        cut = [a.sent for a in gets if a.sent != size]
        assert fills, (digest, [a.sent for a in gets])  # the mirror's fill
        for prev, nxt in zip(fills, fills[1:], strict=False):
            assert nxt.begin >= prev.end, (digest, fills)  # never two complete copies at once
        refetched[digest] = len(fills) - 1
        assert all(g <= CUT_SHORT_MAX for g in cut), (digest, cut)
        assert len(cut) <= filling.get(digest, 0), (digest, cut, filling)  # one stream per 200 answer
        assert refetched[digest] <= filling.get(digest, 0), (digest, refetched, filling)
        cut_short += len(cut)
        bound += size * len(fills)
    total = proxy.blob_bytes()
    print(
        f"origin blob bytes {total} for blobs of {sum(sizes.values())}; whole-blob GETs {proxy.whole_gets()}; "
        f"200 answers the nodes got {filling}; docker-registry refetches {refetched}"
    )
    assert total <= bound + CUT_SHORT_MAX * cut_short
    assert all(a.method in ("GET", "HEAD") for a in proxy.log)


@pytest.mark.registry
def test_three_nodes_on_a_cold_mirror_together(site: dict) -> None:
    """Three nodes start together on a cold mirror: the origin sends each blob once, whole, to the mirror,
    and no byte range to anyone.

    A node whose range request the mirror answers with the whole blob (200: docker-registry filling its
    cache) hangs up at the first byte and waits, asking again (backoff) until the mirror serves the range
    (206); it never reads the range from the origin meanwhile. What else reaches the origin is
    docker-registry's own design and cannot be avoided by a client: a cold blob's first request starts
    `storeLocal` (the one complete GET, into the mirror's storage) AND `copyContent` (a second GET, streamed
    to the requester), and every request while the fill is in flight opens another copyContent stream. The
    client hangs up on each at its first byte, so each costs the origin a prefix bounded by TCP buffering
    (CUT_SHORT_MAX), once per node and blob plus once per poll; a HEAD would cost a whole copy, so none is
    sent. A request arriving just as a fill is stored can make docker-registry fetch the blob again
    (`_check_origin`)."""
    logs: list[str] = []
    [(_, filling)] = _cold_mirror_run(site, [["node1", "node2", "node3"]], logs)
    _check_origin(site, filling, logs)


@pytest.mark.registry
def test_nodes_after_the_fill_cost_the_origin_nothing(site: dict) -> None:
    """Node 1 alone on a cold mirror (it waits for each blob's fill), then nodes 2 and 3 together: the origin
    sees the same as for one node (see the test above), and nodes 2 and 3 cause 0 bytes and get only 206s."""
    logs: list[str] = []
    (first, f1), (later, f23) = _cold_mirror_run(site, [["node1"], ["node2", "node3"]], logs)
    assert later == 0, "nodes 2 and 3 must be served by the mirror alone"
    assert not any(f23.values()), f23
    _check_origin(site, f1, logs)


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


# ---------------------------------------------------------------------------------------------- fill wait


class _FillingMirror(LoopbackHTTP):
    """A blob server: as a mirror, answers range requests with 200 and the whole blob (streamed, like
    docker-registry filling its cache) until `fill_at` (monotonic time), then 206; as an origin (fill_at 0)
    always 206. Logs (status, Range) of every blob request."""

    def __init__(self, data: bytes, fill_at: float) -> None:
        self.data, self.fill_at = data, fill_at
        self.log: list[tuple[int, str]] = []
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                rng = self.headers.get("Range", "")
                filling = time.monotonic() < srv.fill_at
                srv.log.append((200 if filling else 206, rng))
                if filling:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(srv.data)))
                    self.end_headers()
                    body = srv.data
                else:
                    a, b = (int(x) for x in rng.split("=")[1].split("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{b}/{len(srv.data)}")
                    self.send_header("Content-Length", str(b - a + 1))
                    self.end_headers()
                    body = srv.data[a : b + 1]
                try:
                    self.wfile.write(body)
                except OSError:
                    self.close_connection = True

            def log_message(self, *a: object) -> None:
                pass

        self._serve(Handler)


def _fill_client(mirror: _FillingMirror, deadline: float) -> RegistryClient:
    svc = service_config_from_dict({"mirrorConfig": {"hostsDir": "", "snapshotterConfig": "", "retrySec": 30}})
    return RegistryClient(svc, deadline=deadline, mirrors=[MirrorSpec(mirror.host, True, ("*",))])


def test_filling_mirror_is_waited_for_by_one_poller() -> None:
    """Eight threads read ranges of one blob a mirror is filling: one thread polls the mirror (backoff), the
    others wait for it; nobody reads from the origin; afterwards everyone reads the mirror's 206s."""
    data = os.urandom(2 * MiB)
    mirror = _FillingMirror(data, time.monotonic() + 0.6)
    origin = _FillingMirror(data, 0.0)
    client = _fill_client(mirror, deadline=6)
    loc = BlobLocation("http", origin.host, "a/b", "sha256:" + "0" * 64)
    try:
        offsets = [i * 100_000 for i in range(8)]
        out: dict[int, bytes] = {}

        def read(off: int) -> None:
            buf = bytearray(4096)
            client.read_range(loc, off, memoryview(buf), len(data))
            out[off] = bytes(buf)

        threads = [threading.Thread(target=read, args=(o,)) for o in offsets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(out[o] == data[o : o + 4096] for o in offsets)
        assert origin.log == []  # the origin was never asked for a range
        filling = [e for e in mirror.log if e[0] == 200]
        # one poller: its first request and polls at 0.05, 0.15, 0.35, 0.75 s (the fill ends at 0.6 s)
        assert 2 <= len(filling) <= 5, mirror.log
        assert len(mirror.log) == len(filling) + len(offsets)  # one 206 per read after the fill
        # the mirror loses the blob (expired from its cache) and fills it again: waited for again
        mirror.fill_at = time.monotonic() + 0.3
        mirror.log.clear()
        read(1_000_000)
        assert out[1_000_000] == data[1_000_000:1_004_096] and origin.log == []
        assert mirror.log[0][0] == 200 and mirror.log[-1][0] == 206 and len(mirror.log) <= 5, mirror.log
    finally:
        client.close()
        mirror.close()
        origin.close()


def test_fill_outlasting_the_mirror_share_falls_back_and_holds() -> None:
    """A mirror still filling when the read's share of the deadline (1/3 of 3 s) is spent: the read comes
    from the origin, and the next reads of that blob go straight to the origin while the blob is held."""
    data = os.urandom(1 * MiB)
    mirror = _FillingMirror(data, time.monotonic() + 3600)
    origin = _FillingMirror(data, 0.0)
    client = _fill_client(mirror, deadline=3)
    loc = BlobLocation("http", origin.host, "a/b", "sha256:" + "1" * 64)
    try:
        buf = bytearray(4096)
        t0 = time.monotonic()
        client.read_range(loc, 5000, memoryview(buf), len(data))
        took = time.monotonic() - t0
        assert bytes(buf) == data[5000:9096]
        assert 0.5 < took < 2.0, took  # waited for the fill within its 1 s share, then the origin
        polled = len(mirror.log)
        client.read_range(loc, 9000, memoryview(buf), len(data))
        assert bytes(buf) == data[9000:13096] and len(mirror.log) == polled  # held: not asked again
        assert len(origin.log) == 2
    finally:
        client.close()
        mirror.close()
        origin.close()
