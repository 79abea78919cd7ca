"""A site mirror on loopback: origin docker-registry, an access-logging proxy in front of it, and a second
docker-registry as pull-through cache (`proxy: remoteurl:`) of that proxy. Used by test_mirror.py and
bench/startup.py --scale-out.

The origin's own access log does not show `Range` or how many bytes were really sent (a client may hang up
early), so the proxy logs every request with both: that log is "what the origin served".
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.registry import LoopbackHTTP, Registry, build_layout, free_port, spawn_registry, stop_process_group

REPO = Path(__file__).resolve().parents[2]
HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "host"}


@dataclass
class Access:
    """One request the origin answered: what was asked and how many body bytes went out."""

    method: str
    path: str
    range: str
    status: int
    start: int  # first byte offset of the body within the blob (Content-Range start, else 0)
    sent: int
    begin: float = 0.0  # time.monotonic() when the request reached the proxy
    end: float = 0.0  # ... and when its body was done (or cut short)


class AccessLogProxy(LoopbackHTTP):
    """127.0.0.1:<port> -> origin, GET and HEAD streamed through; every request logged as an `Access`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.log: list[Access] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                begin = time.monotonic()
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=30)
                hs = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                try:
                    conn.request(self.command, self.path, headers=hs)
                    resp = conn.getresponse()
                except OSError:  # origin stopped: like a dead registry, a reset
                    self.close_connection = True
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.end_headers()
                cr = resp.getheader("Content-Range", "")
                start = int(cr.split()[1].split("-")[0]) if cr.startswith("bytes ") else 0
                entry = Access(self.command, self.path, self.headers.get("Range", ""), resp.status, start, 0, begin)
                with proxy.lock:
                    proxy.log.append(entry)
                try:
                    while self.command != "HEAD":
                        chunk = resp.read(64 << 10)
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        entry.sent += len(chunk)  # after the write: a hang-up stops the count
                except OSError:
                    self.close_connection = True
                finally:
                    entry.end = time.monotonic()
                    conn.close()

            do_GET = _relay
            do_HEAD = _relay

            def log_message(self, *a: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client hanging up mid-body is expected (and counted), not a traceback

        self._serve(Handler, Server)

    def blob_bytes(self, since: float = 0.0) -> int:
        """Body bytes of blob GETs the origin sent (of requests that arrived at `since`, monotonic, or later)."""
        with self.lock:
            return sum(a.sent for a in self.log if "/blobs/sha256:" in a.path and a.begin >= since)

    def whole_gets(self) -> dict[str, list[int]]:
        """Per blob digest: bytes sent by each GET without Range (a pull-through mirror's fill or stream)."""
        out: dict[str, list[int]] = {}
        with self.lock:
            for a in self.log:
                if "/blobs/sha256:" in a.path and a.method == "GET" and not a.range:
                    out.setdefault(a.path.rsplit("/", 1)[1].split("?")[0], []).append(a.sent)
        return out

    def whole_get_log(self) -> dict[str, list[Access]]:
        """Per blob digest: the GETs without Range, in arrival order (see `whole_gets`)."""
        out: dict[str, list[Access]] = {}
        with self.lock:
            for a in self.log:
                if "/blobs/sha256:" in a.path and a.method == "GET" and not a.range:
                    out.setdefault(a.path.rsplit("/", 1)[1].split("?")[0], []).append(a)
        return out

    def ranged_blob_gets(self) -> list[Access]:
        """Blob GETs with a Range header (a node reading from the origin itself)."""
        with self.lock:
            return [a for a in self.log if "/blobs/sha256:" in a.path and a.method == "GET" and a.range]

    def overlap(self, ranged_only: bool = False) -> dict[str, int]:
        """Per blob digest: bytes the origin sent more than once (0 everywhere = each range fetched once);
        `ranged_only`: among requests with a Range header only (a node's own reads, not a mirror's fills)."""
        per: dict[str, list[tuple[int, int]]] = {}
        with self.lock:
            for a in self.log:
                if "/blobs/sha256:" in a.path and a.sent and (a.range or not ranged_only):
                    d = a.path.rsplit("/", 1)[1].split("?")[0]
                    per.setdefault(d, []).append((a.start, a.start + a.sent))
        out = {}
        for d, spans in per.items():
            total = sum(e - s for s, e in spans)
            covered, end = 0, -1
            for s, e in sorted(spans):
                if e > end:
                    covered += e - max(s, end)
                    end = e
            out[d] = total - covered
        return out

    def reset(self) -> None:
        with self.lock:
            self.log.clear()


class PullThroughMirror:
    """docker-registry with `proxy: remoteurl:` (a pull-through cache), on 127.0.0.1:<port>."""

    def __init__(self, workdir: Path, remote: str, port: int = 0) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "mirror.yml"
        self.config.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {workdir / 'storage'}\nhttp:\n  addr: 127.0.0.1:{self.port}\n"
            f"proxy:\n  remoteurl: {remote}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = spawn_registry(self.config, self.workdir / "mirror.log", self.port)

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.proc = None


def write_hosts_dir(d: Path, origin: str, mirror: str) -> Path:
    """containerd's hosts directory: `<d>/<origin>/hosts.toml` sending pulls to the mirror first."""
    (d / origin).mkdir(parents=True, exist_ok=True)
    (d / origin / "hosts.toml").write_text(
        f'server = "http://{origin}"\n\n[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return d


def node_service(node_dir: Path, hosts_dir: Path | str, deadline: int = 10, retry_sec: int = 30) -> Path:
    """One simulated node's overlaybd.json: its own cache, the shared hosts directory."""
    node_dir.mkdir(parents=True, exist_ok=True)
    (node_dir / "cred.json").write_text('{"auths": {}}')
    doc = {
        "cacheConfig": {"cacheType": "file", "cacheDir": str(node_dir / "cache"), "cacheSizeGB": 1},
        "credentialConfig": {"mode": "file", "path": str(node_dir / "cred.json")},
        "enableAudit": False,
        "download": {"enable": False},
        "readDeadlineSec": deadline,
        "mirrorConfig": {"hostsDir": str(hosts_dir), "snapshotterConfig": "", "retrySec": retry_sec},
    }
    p = node_dir / "overlaybd.json"
    p.write_text(json.dumps(doc))
    return p


NODE_SCRIPT = r"""
import hashlib, json, logging, random, sys
logging.basicConfig(level=logging.INFO, format="%(relativeCreated)6.0fms %(threadName)s %(levelname)s %(message)s")
from overlaybd.config.service import load_service_config
from overlaybd.config.image_config import device_config_from_dict
from overlaybd.registry import open_remote_blob
from overlaybd.registry.metrics import METRICS
svc = load_service_config(sys.argv[1])
job = json.loads(sys.argv[2])
out, filling = {}, {}
for b in job["blobs"]:
    lower = device_config_from_dict({"lowers": [{"digest": b["digest"], "size": b["size"]}]}).lowers[0]
    before = METRICS.errors.get("mirror_filling", 0)
    f = open_remote_blob(job["repo_url"], lower, svc)
    rng = random.Random(job["seed"])
    h = hashlib.sha256()
    for _ in range(job["reads"]):
        off = rng.randrange(0, max(1, b["size"] - job["len"]))
        h.update(f.pread(job["len"], off))
    f.close()
    out[b["digest"]] = h.hexdigest()
    filling[b["digest"]] = METRICS.errors.get("mirror_filling", 0) - before
print(json.dumps({"hashes": out, "filling": filling}))
"""


def expected_reads(blobs: list[tuple[dict, bytes]], reads: int, length: int, seed: int) -> dict[str, str]:
    """What NODE_SCRIPT must print for these blobs (read from the local copies)."""
    import hashlib
    import random

    out = {}
    for desc, data in blobs:
        rng = random.Random(seed)
        h = hashlib.sha256()
        for _ in range(reads):
            off = rng.randrange(0, max(1, desc["size"] - length))
            h.update(data[off : off + length])
        out[desc["digest"]] = h.hexdigest()
    return out


def start_node(
    service: Path, repo_url: str, blobs: list[dict], reads: int, length: int, seed: int
) -> subprocess.Popen[str]:
    """One node: its own process (and cache) reading `reads` random ranges of each blob lazily."""
    job = {"repo_url": repo_url, "blobs": blobs, "reads": reads, "len": length, "seed": seed}
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    return subprocess.Popen(
        [sys.executable, "-c", NODE_SCRIPT, str(service), json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish_node(
    p: subprocess.Popen[str],
    timeout: float = 120,
    filling: dict[str, int] | None = None,
    logs: list[str] | None = None,
) -> dict[str, str]:
    """What the node read (digest -> sha256 of its reads, as `expected_reads`). `filling`, if given, is
    incremented per digest by the number of 200 answers ("filling its cache") the node got from a mirror
    to its range requests: each is one whole-blob stream docker-registry opened at the origin. `logs`, if
    given, gets the node's log (INFO and above)."""
    out, err = p.communicate(timeout=timeout)
    if logs is not None:
        logs.append(err)
    if p.returncode != 0:
        raise AssertionError(f"node failed ({p.returncode}): {err[-3000:]}")
    doc = json.loads(out.strip().splitlines()[-1])
    if filling is not None:
        for d, n in doc["filling"].items():
            filling[d] = filling.get(d, 0) + n
    return dict(doc["hashes"])


@contextlib.contextmanager
def mirror_site(tmp: Path, make_mirror: Callable[[str], Any], blob_mib: int, blobs: int = 2) -> Iterator[dict]:
    """An origin registry with `blobs` random blobs of `blob_mib` MiB pushed as library/app, the access-log
    proxy in front of it, the mirror `make_mirror(proxy host)` returns, and a hosts dir naming that mirror.

    Everybody reaches the origin through the logging proxy (nodes too, when they fall back), so its log is
    everything the origin served; to the nodes "the registry" is the proxy's address."""
    origin = Registry(tmp / "origin")
    proxy = AccessLogProxy(origin.port)
    mirror = None
    try:
        mirror = make_mirror(proxy.host)
        datas, files = [], []
        for i in range(blobs):
            data = os.urandom(blob_mib << 20)
            f = tmp / f"blob{i}"
            f.write_bytes(data)
            files.append(f)
            datas.append(data)
        layers = build_layout(tmp / "oci", "v1", files)
        origin.push(tmp / "oci", "v1", "library/app")
        site = {
            "origin": origin,
            "proxy": proxy,
            "mirror": mirror,
            "hosts": write_hosts_dir(tmp / "certs.d", proxy.host, mirror.host),
            "layers": layers,
            "pairs": list(zip(layers, datas, strict=True)),
            "repo_url": f"http://{proxy.host}/v2/library/app/blobs",
            "tmp": tmp,
        }
        proxy.reset()  # the push went to the origin directly; count only what nodes cause
        yield site
    finally:
        if mirror is not None:
            (getattr(mirror, "close", None) or mirror.stop)()
        proxy.close()
        origin.close()
