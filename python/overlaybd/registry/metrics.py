"""Process-wide registry/cache metrics and the Prometheus endpoint (`exporterConfig`).

Counters are plain integers under one lock: increments happen once per HTTP
request or cache block, not per byte, so contention is negligible.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.bytes_fetched = 0
            self.requests = 0
            self.cache_hits = 0
            self.cache_misses = 0
            self.cache_bytes_served = 0
            self.cache_corrupt_blocks = 0
            self.blobs_verified = 0
            self.evicted_bytes = 0
            self.errors: dict[str, int] = {}
            self.bk_download_bytes = 0
            self._lat_counts = [0] * (len(LATENCY_BUCKETS) + 1)
            self._lat_sum = 0.0

    def fetched(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.bytes_fetched += nbytes
            self.requests += 1
            self._lat_sum += seconds
            for i, b in enumerate(LATENCY_BUCKETS):
                if seconds <= b:
                    self._lat_counts[i] += 1
                    break
            else:
                self._lat_counts[-1] += 1

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        with self._lock:
            out = []

            def counter(name: str, help_: str, value: float) -> None:
                out.append(f"# HELP {name} {help_}\n# TYPE {name} counter\n{name} {value}\n")

            counter("overlaybd_registry_bytes_fetched_total", "Bytes fetched from registries.", self.bytes_fetched)
            counter("overlaybd_registry_requests_total", "Blob range requests completed.", self.requests)
            counter("overlaybd_cache_hits_total", "Reads served entirely from the block cache.", self.cache_hits)
            counter("overlaybd_cache_misses_total", "Reads that needed a registry fetch.", self.cache_misses)
            counter(
                "overlaybd_cache_corrupt_blocks_total",
                "Cached pages dropped: a bad checksum, or a record that does not match its page.",
                self.cache_corrupt_blocks,
            )
            counter(
                "overlaybd_cache_blobs_verified_total",
                "Blobs fully cached whose sha256 matched their digest (mismatches: errors kind=digest_mismatch).",
                self.blobs_verified,
            )
            counter("overlaybd_cache_evicted_bytes_total", "Bytes evicted from the block cache.", self.evicted_bytes)
            counter(
                "overlaybd_background_download_bytes_total",
                "Bytes written by background download.",
                self.bk_download_bytes,
            )
            out.append(
                "# HELP overlaybd_registry_errors_total Registry request failures by kind.\n"
                "# TYPE overlaybd_registry_errors_total counter\n"
            )
            for kind, n in sorted(self.errors.items()):
                out.append(f'overlaybd_registry_errors_total{{kind="{kind}"}} {n}\n')
            name = "overlaybd_registry_request_seconds"
            out.append(f"# HELP {name} Latency of blob range requests.\n# TYPE {name} histogram\n")
            cum = 0
            for b, n in zip(LATENCY_BUCKETS, self._lat_counts, strict=False):
                cum += n
                out.append(f'{name}_bucket{{le="{b}"}} {cum}\n')
            cum += self._lat_counts[-1]
            out.append(f'{name}_bucket{{le="+Inf"}} {cum}\n{name}_sum {self._lat_sum}\n{name}_count {cum}\n')
            return "".join(out)


METRICS = Metrics()

_exporter: ThreadingHTTPServer | None = None
_exporter_lock = threading.Lock()


def start_exporter(port: int, uri_prefix: str = "/metrics", host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve METRICS at http://host:port<uri_prefix> in a daemon thread (idempotent per process)."""
    global _exporter
    with _exporter_lock:
        if _exporter is not None:
            return _exporter
        prefix = uri_prefix or "/metrics"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server API
                if self.path.split("?")[0] != prefix:
                    self.send_error(404)
                    return
                body = METRICS.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        srv = ThreadingHTTPServer((host, port), Handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, name="overlaybd-metrics", daemon=True).start()
        _exporter = srv
        return srv


def stop_exporter() -> None:
    global _exporter
    with _exporter_lock:
        if _exporter is not None:
            _exporter.shutdown()
            _exporter.server_close()
            _exporter = None


def maybe_start_exporter(service: Any) -> None:
    ec = getattr(service, "exporter_config", None)
    if ec is not None and ec.enable:
        start_exporter(ec.port, ec.uri_prefix)
