"""nginx as a range-caching site mirror of a registry (slice module + proxy_cache_lock), on 127.0.0.1.

Blob GETs are cached in fixed slices: every request to the origin is one slice-aligned `Range`, each slice is
fetched once (concurrent requests for a slice wait for the first one's fill: `proxy_cache_lock`), and a node's
range that spans slices is assembled from them. Everything else under /v2/ (the ping, manifests, tags) is
passed through uncached. Used by tests/registry/test_mirror_slice.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers.registry import free_port

NGINX = "/usr/sbin/nginx"

CONF = """\
# overlaybd site mirror: nginx caching the origin registry's blobs in {slice} slices
user root;
worker_processes 2;
pid {wd}/nginx.pid;
error_log {wd}/error.log warn;
events {{ worker_connections 1024; }}

http {{
    log_format slice '$request_method $request_uri range="$http_range" $status $body_bytes_sent '
                     'cache=$upstream_cache_status';
    access_log {wd}/access.log slice;
    client_body_temp_path {wd}/tmp/body;
    proxy_temp_path {wd}/tmp/proxy;
    fastcgi_temp_path {wd}/tmp/fastcgi;
    uwsgi_temp_path {wd}/tmp/uwsgi;
    scgi_temp_path {wd}/tmp/scgi;

    proxy_cache_path {wd}/cache levels=1:2 keys_zone=blobs:10m max_size={max_size} inactive=7d
                     use_temp_path=off;

    upstream origin {{
        server {upstream};
        keepalive 16;
    }}

    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;

        # Blobs are content addresses (the URI names their sha256), so a slice cached under its URI
        # (repository and digest) is the same bytes for every client and credential; the key is $uri, which
        # excludes the query (containerd's `?ns=<registry>`, which overlaybd sends to mirrors too), plus the
        # slice's range.
        # Anyone who can reach this mirror can read a cached blob whose digest they know: keep it on the
        # site network, as any pull-through cache.
        location ~ ^/v2/.+/blobs/sha256: {{
            limit_except GET {{ deny all; }}  # GET implies HEAD; a pull mirror takes no uploads
            slice {slice};
            proxy_cache blobs;
            proxy_cache_key $uri$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 1h;
            proxy_cache_lock on;             # one origin fetch per slice; concurrent readers wait for it
            proxy_cache_lock_timeout 120s;   # then a waiter would fetch itself (uncached): never, in practice
            proxy_cache_lock_age 120s;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header Authorization $http_authorization;
            proxy_buffering on;
            proxy_read_timeout 60s;
            proxy_pass http://origin;
        }}

        location /v2/ {{
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header Accept $http_accept;
            proxy_set_header Authorization $http_authorization;
            proxy_buffering off;
            proxy_cache off;
            proxy_pass http://origin;
        }}
    }}
}}
"""


def need_nginx() -> None:
    if not os.access(NGINX, os.X_OK):
        pytest.skip("nginx with the slice module is needed (apt-get install nginx-light)")


class NginxSliceMirror:
    """`nginx -c <workdir>/nginx.conf -g 'daemon off;'` as a child process; `.host` is "127.0.0.1:PORT"."""

    def __init__(self, workdir: Path, upstream_host_port: str, slice_size: str = "1m", max_size: str = "1g") -> None:
        need_nginx()
        self.workdir = workdir
        self.upstream = upstream_host_port
        self.slice_size = slice_size
        self.max_size = max_size
        self.port = free_port()
        self.cache_dir = workdir / "cache"
        workdir.mkdir(parents=True, exist_ok=True)
        for d in ("tmp", "cache"):
            (workdir / d).mkdir(exist_ok=True)
        self.conf = workdir / "nginx.conf"
        self.error_log = workdir / "error.log"
        self.access_log = workdir / "access.log"
        self.write_conf()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_conf(self) -> None:
        self.conf.write_text(
            CONF.format(
                wd=self.workdir,
                port=self.port,
                upstream=self.upstream,
                slice=self.slice_size,
                max_size=self.max_size,
            )
        )

    def start(self) -> None:
        """Start nginx (the cache dir kept) and return once it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.workdir / "nginx.out", "ab") as out:
            self.proc = subprocess.Popen(
                [NGINX, "-p", str(self.workdir), "-e", str(self.error_log), "-c", str(self.conf), "-g", "daemon off;"],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        log = self.error_log.read_text() if self.error_log.exists() else ""
        raise RuntimeError(f"nginx did not start on {self.host}: {log[-2000:]}")

    def stop(self) -> None:
        """SIGTERM (fast shutdown) to the master's process group, SIGKILL after 5 s; waits for it."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        except ProcessLookupError:
            p.wait()

    def clear_cache(self) -> None:
        """Empty the slice cache (stopped mirror only: the running one keeps its index in shared memory)."""
        assert self.proc is None, "stop the mirror first"
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.cache_dir.mkdir()

    def cache_files(self) -> list[Path]:
        return [p for p in self.cache_dir.rglob("*") if p.is_file()]

    def close(self) -> None:
        self.stop()
