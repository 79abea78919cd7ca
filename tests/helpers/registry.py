"""A real Debian docker-registry on 127.0.0.1 (anonymous, htpasswd Basic, or token auth), OCI layouts
built from the vectors and pushed with skopeo, a counting/fault-injecting test proxy, and the service and
device configs the registry tests open blobs with.

The token endpoint is a small test server that signs RS256 JWTs with a throwaway
key (openssl CLI); the registry trusts its certificate through `auth.token.rootcertbundle`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from overlaybd.config.image_config import device_config_from_dict
from overlaybd.config.service import service_config_from_dict

REGISTRY_BIN = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_registry(config: Path, log_path: Path, port: int, tls: bool = False) -> subprocess.Popen[bytes]:
    """`docker-registry serve config` in its own session, output appended to log_path; returns once it
    answers on 127.0.0.1:port (a TCP connect for TLS, else GET /v2/, where 401 also means up)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(REGISTRY_BIN), "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if tls:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            else:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return proc
        except urllib.error.HTTPError:
            return proc  # 401 = up, auth required
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    stop_process_group(proc)
    raise RuntimeError(f"docker-registry did not start; log: {log_path.read_text()[-2000:]}")


def stop_process_group(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process group of a start_new_session child, SIGKILL if it is not gone within 5 s."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --------------------------------------------------------------------------- token endpoint


class TokenIssuer:
    """Test token endpoint: Basic-authenticates (if users are set) and signs JWTs with a test key."""

    def __init__(self, workdir: Path, users: dict[str, str]) -> None:
        self.dir = workdir
        self.users = users
        self.key = workdir / "token.key"
        self.cert = workdir / "token.crt"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(self.key),
                "-out",
                str(self.cert),
                "-subj",
                "/CN=obd-test-token",
                "-days",
                "2",
            ],
            check=True,
            capture_output=True,
        )
        pub = subprocess.run(
            f"openssl x509 -in {self.cert} -pubkey -noout | openssl pkey -pubin -outform DER",
            shell=True,
            check=True,
            capture_output=True,
        ).stdout
        # libtrust key id: base32(sha256(DER SubjectPublicKeyInfo)[:30]) in groups of 4 joined by ':'
        b32 = base64.b32encode(hashlib.sha256(pub).digest()[:30]).decode().rstrip("=")
        self.kid = ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))
        self.service = "obd-test-registry"
        self.issuer = "obd-test-issuer"
        self.requests = 0
        self.expire_next = 0  # issue this many already-expired tokens (server still says expires_in 300)
        self.port = free_port()
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.requests += 1
                from urllib.parse import parse_qs, urlsplit

                q = parse_qs(urlsplit(self.path).query)
                user = ""
                if issuer.users:
                    hdr = self.headers.get("Authorization", "")
                    ok = False
                    if hdr.startswith("Basic "):
                        u, _, p = base64.b64decode(hdr[6:]).decode().partition(":")
                        ok = issuer.users.get(u) == p
                        user = u
                    if not ok:
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                access = []
                for scope in q.get("scope", []):
                    parts = scope.split(":")
                    if len(parts) >= 3:
                        access.append(
                            {"type": parts[0], "name": ":".join(parts[1:-1]), "actions": parts[-1].split(",")}
                        )
                expired = issuer.expire_next > 0
                if expired:
                    issuer.expire_next -= 1
                body = json.dumps({"token": issuer.sign(user, access, expired), "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, user: str, access: list, expired: bool) -> str:
        now = int(time.time())
        exp = now - 120 if expired else now + 600
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": exp,
            "nbf": now - 300,
            "iat": now - 300,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{b64url(sig)}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- registry


@dataclass
class Registry:
    """A docker-registry process on 127.0.0.1:port with its storage in `root`."""

    workdir: Path
    auth: str = "none"  # none | htpasswd | token
    users: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    token: TokenIssuer | None = None
    tls: bool = False  # serve HTTPS with a test CA; require client certificates signed by it

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.root = self.workdir / "storage"
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = [
            "version: 0.1",
            "log:",
            "  level: error",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.root}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
        ]
        if self.tls:
            self.certs = make_test_pki(self.workdir / "pki")
            cfg += [
                "  tls:",
                f"    certificate: {self.certs / 'server.crt'}",
                f"    key: {self.certs / 'server.key'}",
                "    clientcas:",
                f"      - {self.certs / 'ca.crt'}",
            ]
        if self.auth == "htpasswd":
            lines = [
                subprocess.run(["htpasswd", "-Bbn", u, p], check=True, capture_output=True, text=True).stdout.strip()
                for u, p in self.users.items()
            ]
            (self.workdir / "htpasswd").write_text("\n".join(lines) + "\n")
            cfg += ["auth:", "  htpasswd:", "    realm: obd-test", f"    path: {self.workdir / 'htpasswd'}"]
        elif self.auth == "token":
            self.token = TokenIssuer(self.workdir, self.users)
            cfg += [
                "auth:",
                "  token:",
                f"    realm: {self.token.realm}",
                f"    service: {self.token.service}",
                f"    issuer: {self.token.issuer}",
                f"    rootcertbundle: {self.token.cert}",
            ]
        self.config = self.workdir / "registry.yml"
        self.config.write_text("\n".join(cfg) + "\n")
        self.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = spawn_registry(self.config, self.workdir / "registry.log", self.port, tls=self.tls)

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self.token:
            self.token.close()

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def push(self, layout: Path, tag: str, repo: str, creds: str = "", fmt: str = "") -> None:
        """skopeo copy; digests preserved (else skopeo gzips layers) unless a manifest format is forced."""
        opts = ["--format", fmt] if fmt else ["--preserve-digests", "--all"]
        cmd = [
            SKOPEO,
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            *opts,
            f"oci:{layout}:{tag}",
            f"docker://{self.host}/{repo}:{tag}",
        ]
        if creds:
            cmd[2:2] = ["--dest-creds", creds]
        if self.tls:
            cmd[2:2] = ["--dest-cert-dir", str(self.certs / "skopeo")]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def make_test_pki(d: Path) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    d.mkdir(parents=True)

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ossl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=obd-test-ca",
        "-days",
        "2",
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        ossl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=obd-test-{name}",
        )
        ossl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            *ext,
        )
    sk = d / "skopeo"  # skopeo --dest-cert-dir layout: *.crt = CAs, *.cert + *.key = client pair
    sk.mkdir()
    shutil.copy(d / "ca.crt", sk / "ca.crt")
    shutil.copy(d / "client.crt", sk / "client.cert")
    shutil.copy(d / "client.key", sk / "client.key")
    return d


def need_tools() -> None:
    if not REGISTRY_BIN or not SKOPEO:
        pytest.skip("docker-registry and skopeo are needed (apt-get install docker-registry skopeo)")


# --------------------------------------------------------------------------- OCI layouts

LAYER_MEDIA = "application/vnd.oci.image.layer.v1.tar"


def _put_blob(layout: Path, data: bytes) -> dict:
    d = hashlib.sha256(data).hexdigest()
    p = layout / "blobs" / "sha256" / d
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return {"digest": f"sha256:{d}", "size": len(data)}


def build_layout(layout: Path, tag: str, layer_files: list[Path], arch: str = "amd64") -> list[dict]:
    """OCI layout whose layers are the given overlaybd blobs; returns the layer descriptors (bottom -> top)."""
    mdesc, layers = _image(layout, tag, layer_files, arch)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    return layers


def build_multiarch_layout(layout: Path, tag: str, per_arch: dict[str, list[Path]]) -> dict[str, str]:
    """OCI layout whose tag is an image index with one manifest per architecture; returns arch -> manifest digest."""
    descs = {arch: _image(layout, tag, files, arch)[0] for arch, files in per_arch.items()}
    for d in descs.values():
        d.pop("annotations")
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": list(descs.values())}
    ).encode()
    idesc = _put_blob(layout, index)
    idesc["mediaType"] = "application/vnd.oci.image.index.v1+json"
    idesc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [idesc]}))
    return {arch: d["digest"] for arch, d in descs.items()}


def _image(layout: Path, tag: str, layer_files: list[Path], arch: str) -> tuple[dict, list[dict]]:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    layers = []
    for f in layer_files:
        desc = _put_blob(layout, f.read_bytes())
        desc["mediaType"] = LAYER_MEDIA
        desc["annotations"] = {
            "containerd.io/snapshot/overlaybd/version": "0.1.0",
            "containerd.io/snapshot/overlaybd/blob-digest": desc["digest"],
            "containerd.io/snapshot/overlaybd/blob-size": str(desc["size"]),
        }
        layers.append(desc)
    config = json.dumps(
        {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in layers]}}
    ).encode()
    cdesc = _put_blob(layout, config)
    cdesc["mediaType"] = "application/vnd.oci.image.config.v1+json"
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": cdesc,
            "layers": layers,
        }
    ).encode()
    mdesc = _put_blob(layout, manifest)
    mdesc["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    mdesc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    mdesc["platform"] = {"os": "linux", "architecture": arch}
    return mdesc, layers


# --------------------------------------------------------------------------- test proxy


class LoopbackHTTP:
    """Base of the test HTTP servers: `_serve(Handler)` serves it on 127.0.0.1:<free port> from a daemon
    thread; `host`, `close()`."""

    server: http.server.ThreadingHTTPServer
    port: int

    def _serve(
        self,
        handler: type[http.server.BaseHTTPRequestHandler],
        server_cls: type[http.server.ThreadingHTTPServer] = http.server.ThreadingHTTPServer,
    ) -> None:
        self.server = server_cls(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FaultProxy(LoopbackHTTP):
    """Test proxy (NOT a fake registry): forwards to the real registry, counts the body bytes it relays,
    and can inject faults — `fail_next` 500s, `truncate_next` bodies cut in half, `reset_next` resets."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.bytes_relayed = 0
        self.ranges: list[str] = []
        self.fail_next = 0
        self.truncate_next = 0
        self.p2p_requests = 0
        self.redirect_blobs = False
        self.redirects = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with proxy.lock:
                    fail = proxy.fail_next > 0
                    if fail:
                        proxy.fail_next -= 1
                    trunc = not fail and proxy.truncate_next > 0 and "Range" in self.headers
                    if trunc:
                        proxy.truncate_next -= 1
                if fail:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if proxy.redirect_blobs and "/blobs/" in self.path:
                    # like a registry sending blob downloads to object storage (here: the registry itself)
                    with proxy.lock:
                        proxy.redirects += 1
                    self.send_response(307)
                    self.send_header("Location", f"http://127.0.0.1:{proxy.upstream}{self.path}?signed=1")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = self.path
                # As a P2P stand-in it also accepts proxy requests (absolute URI) and upstream's prefix form
                # `/<anything>/http://host/v2/...`; either way the request goes to the real registry.
                at = path.find("http://")
                if at >= 0:
                    proxy.p2p_requests += 1
                    path = "/" + path[at:].split("/", 3)[3]
                req = urllib.request.Request(f"http://127.0.0.1:{proxy.upstream}{path}")
                for k in ("Range", "Authorization", "Accept", "User-Agent"):
                    if k in self.headers:
                        req.add_header(k, self.headers[k])
                if "Range" in self.headers:
                    proxy.ranges.append(self.headers["Range"])
                try:
                    resp = urllib.request.urlopen(req, timeout=10)
                except urllib.error.HTTPError as e:
                    resp = e
                body = resp.read()
                self.send_response(resp.status if hasattr(resp, "status") else resp.code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if trunc:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                with proxy.lock:  # counted before sending, so a client that has the bytes sees the count
                    proxy.bytes_relayed += len(body)
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self._serve(Handler)


def make_service(
    tmp: Path,
    *,
    cred: dict | None = None,
    refill: int = 262144,
    audit: bool = False,
    download: dict | None = None,
    extra: dict | None = None,
) -> Any:
    doc: dict[str, Any] = {
        "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp / "cache"), "cacheSizeGB": 1, "refillSize": refill},
        "credentialConfig": {"mode": "file", "path": str(tmp / "cred.json")},
        "enableAudit": audit,
        "auditPath": str(tmp / "audit.log"),
        "download": download or {"enable": False},
    }
    doc.update(extra or {})
    (tmp / "cred.json").write_text(json.dumps(cred or {"auths": {}}))
    return service_config_from_dict(doc, str(tmp / "overlaybd.json"))


def device(repo_blob_url: str, layers: list[dict], dirs: list[str] | None = None) -> Any:
    lowers = [{"digest": x["digest"], "size": x["size"]} for x in layers]
    for lo, d in zip(lowers, dirs or [], strict=False):
        lo["dir"] = d
    return device_config_from_dict({"repoBlobUrl": repo_blob_url, "lowers": lowers})


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's size= syntax) at `path`: a cache disk that fills up (ENOSPC mid-fill)."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
