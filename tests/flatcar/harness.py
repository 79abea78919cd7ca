"""Everything the flatcar tier prepares on the host before the guest boots, and the boots themselves.

Why all in one run: a TCG boot of systemd costs about a minute on this 2-core machine, so the scenarios
share three boots (see guest/bootN.sh) of one disk: first boot (a, c, first half of b), the boot into the
updated release (b, e), a boot with a hand-placed image for the wrong release (b, d). Each test then
reads its checks from the collected results.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from helpers.sysext import FLATCAR_VERSION, Built, build

from . import guest_image as gi

HERE = Path(__file__).resolve().parent
GUEST = HERE / "guest"
REPO = gi.REPO

V1 = FLATCAR_VERSION  # the release the machine is provisioned with (= the Makefile default)
V2 = os.environ.get("OVERLAYBD_FLATCAR_NEXT_VERSION", "4628.1.0")  # the release it updates to
BOARD = "amd64-usr"
BUTANE = Path(os.environ.get("OVERLAYBD_BUTANE", REPO.parent / "shared" / "tools" / "butane"))
IGNITION_CANDIDATES = (
    "/usr/lib/dracut/modules.d/30ignition/ignition",  # Debian's package `ignition` (2.14)
    "/usr/lib/ignition/ignition",
    "/usr/bin/ignition",
)
REG_USER, REG_PASS = "obd", "lazy-secret-1"
IMAGE = "127.0.0.1:5000/obd/hello:obd"
HELLO = "hello from a lazily fetched overlaybd layer"
PAYLOAD = "flatcar_test_update-flatcar-overlaybd.gz"
BOOTS = 4
# Item 3's route: the SYSEXT_LEVEL image, published with SHA256SUMS on the in-guest server.
SYSUPDATE_URL = "http://127.0.0.1:8080/sysupdate/"
SYSUPDATE_VERSIONS = ("0.1.0", "0.2.0")  # Ignition installs the first, systemd-sysupdate fetches the second
SYSUPDATE_ARCH = "x86-64"


def ignition_binary() -> Path | None:
    """Debian ships ignition only inside its dracut module; find it wherever the package put it."""
    for c in IGNITION_CANDIDATES:
        if os.access(c, os.X_OK):
            return Path(c)
    return None


def unavailable() -> str | None:
    """Why the tier cannot run here (None: it can)."""
    why = gi.unavailable()
    if why:
        return why
    if not BUTANE.is_file():
        return f"the real butane is missing at {BUTANE} (shared/tools; set OVERLAYBD_BUTANE)"
    if ignition_binary() is None:
        return "Debian's ignition is not installed (apt-get install ignition)"
    for tool in ("docker-registry", "skopeo", "htpasswd", "openssl"):
        if not shutil.which(tool):
            return f"{tool} missing (.ci/install-deps installs it)"
    return None


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    """Run a host command; its output goes into the error when it fails."""
    return gi.run(cmd, **kw)


# --------------------------------------------------------------------------- sysext images and payloads


@dataclass
class Release:
    """One target release: its image and the payload the release server offers for it."""

    version: str
    image: Path
    payload: Path
    raw_sha256: str


def sysupdate_route_available() -> bool:
    """Whether the build has item 3's route (--sysext-level image, sysupdate transfer, Butane delivery)."""
    helptext = subprocess.run([str(REPO / "build.sh"), "--help"], capture_output=True, text=True).stdout
    return "--sysupdate-url" in helptext and (REPO / "butane" / "sysupdate-overlaybd.transfer.j2").is_file()


def build_releases(work: Path, key: Path) -> tuple[Built, dict[str, Release]]:
    """The lockstep image and its signed update payload for V1 and V2, from one frozen bundle.

    The default build in REPO/out (or $OVERLAYBD_FLATCAR_OUT) is the one the sysext tier and `make` use
    (reused by input key); each release is then packed from a copy of its bundle with the test's payload
    key (one key for both, as the guest trusts one), so PyInstaller runs at most once per session.
    """
    base = build(Path(os.environ.get("OVERLAYBD_FLATCAR_OUT", REPO / "out")), ["--flatcar-version", V1])
    assert (base.bundle / "bin" / "overlaybd-download-sysext").exists(), "the bundle has no overlaybd-download-sysext"
    releases: dict[str, Release] = {}
    for version in (V1, V2):
        out = work / f"release-{version}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        shutil.copytree(base.bundle, out / "bundle", symlinks=True)
        built = build(out, ["--flatcar-version", version, "--reuse-bundle", "--payload-key", str(key)])
        payload = out / PAYLOAD
        assert payload.is_file(), f"build.sh --payload-key made no {payload}: {sorted(os.listdir(out))}"
        raw_sha = hashlib.sha256(built.image.read_bytes()).hexdigest()
        releases[version] = Release(version, built.image, payload, raw_sha)
    return base, releases


@dataclass
class SysupdateRoute:
    """The sysupdate route's images (by version), their SHA256SUMS, and what Butane set up for it."""

    images: dict[str, Path]
    sums: str
    transfer: bytes
    link: tuple[str, str]


def build_sysupdate_route(work: Path, base: Built) -> SysupdateRoute:
    """Two versions of the --sysext-level image from the same bundle, and the Butane delivery=sysupdate files.

    Ignition does not install these on the host: the first image's source is the in-guest server, which
    the host cannot reach; the transfer file and the link are taken from the Ignition JSON the real butane
    made, and boot 3 puts them in place as Ignition would.
    """
    images: dict[str, Path] = {}
    sums = ""
    for version in SYSUPDATE_VERSIONS:
        out = work / f"sysupdate-{version}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        shutil.copytree(base.bundle, out / "bundle", symlinks=True)
        args = ["--sysext-level", "--flatcar-version", V1, "--sysext-version", version]
        built = build(out, [*args, "--sysupdate-url", SYSUPDATE_URL, "--reuse-bundle"])
        image = out / f"overlaybd_{version}_{SYSUPDATE_ARCH}.raw"
        assert image.is_file(), f"no {image.name} in {sorted(os.listdir(out))}\n{built.log[-2000:]}"
        images[version] = image
        sums += (out / "SHA256SUMS").read_text()
    first = images[SYSUPDATE_VERSIONS[0]]
    bu = work / "sysupdate.bu"
    sh(
        [
            str(REPO / ".venv" / "bin" / "overlaybd-butane"),
            "--var",
            "butane_version=1.0.0",
            "--var",
            "delivery=sysupdate",
            "--var",
            f"sysupdate_url={SYSUPDATE_URL}",
            "--var",
            f"sysupdate_version={SYSUPDATE_VERSIONS[0]}",
            "--var",
            f"sysupdate_sha256={hashlib.sha256(first.read_bytes()).hexdigest()}",
            "-o",
            str(bu),
        ]
    )
    with open(bu) as f:
        res = subprocess.run([str(BUTANE), "--strict"], stdin=f, capture_output=True, text=True)
    assert res.returncode == 0, f"butane --strict rejected the delivery=sysupdate config:\n{res.stderr}"
    ign = json.loads(res.stdout)
    files = {f["path"]: f for f in ign["storage"]["files"]}
    entry = files["/etc/sysupdate.overlaybd.d/overlaybd.transfer"]["contents"]
    transfer = decode_data_url(entry["source"])
    if entry.get("compression") == "gzip":
        transfer = gzip.decompress(transfer)
    link = next(ln for ln in ign["storage"]["links"] if ln["path"] == "/etc/extensions/overlaybd.raw")
    return SysupdateRoute(images, sums, transfer, (link["path"], link["target"]))


def make_key(work: Path) -> tuple[Path, Path]:
    """A throwaway update payload signing key (tests never use a real one) and its public half."""
    key, pub = work / "payload-key.pem", work / "payload-key.pub.pem"
    if not key.exists():
        sh(["openssl", "genrsa", "-out", str(key), "2048"])
        sh(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)])
    return key, pub


# --------------------------------------------------------------------------- the registry content


def make_registry_storage(work: Path) -> tuple[Path, dict[str, int]]:
    """An overlaybd image converted on the host straight into a registry whose storage dir the guest serves.

    The image carries 24 MiB of incompressible data the container never reads, so a lazy run fetches a
    small fraction of the layer. Returns the storage dir and {layer digest: size}.
    """
    import urllib.request

    from helpers.oci_images import busybox_layer, write_layout
    from overlaybd.cli.convert import main as convert_main

    src, storage = work / "img-src", work / "registry-storage"
    for d in (src, storage):
        if d.exists():
            shutil.rmtree(d)
    extra = {"etc/hello.txt": HELLO.encode() + b"\n", "data/big.bin": os.urandom(24 << 20)}
    write_layout(src, "localhost/obd/hello:1", [busybox_layer(extra=extra)])
    storage.mkdir()
    port = _free_port()
    cfg = work / "registry-push.yml"
    cfg.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {storage}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    with open(work / "registry-push.log", "wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/v2/", proc)
        ref = f"docker://127.0.0.1:{port}/obd/hello:obd"
        args = [f"oci:{src}", ref, "--insecure", "--vsize", "1", "--work-dir", str(work / "convert")]
        assert convert_main(args) == 0, "overlaybd-convert failed"
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/obd/hello/manifests/obd",
            headers={
                "Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                "application/vnd.oci.image.manifest.v1+json"
            },
        )
        manifest = json.loads(urllib.request.urlopen(req, timeout=10).read())
    finally:
        proc.terminate()
        proc.wait(10)
    layers = {ly["digest"]: int(ly["size"]) for ly in manifest["layers"]}
    return storage, layers


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    raise gi.GuestError(f"registry at {url} did not start")


# --------------------------------------------------------------------------- Butane -> Ignition -> disk


@dataclass
class Provisioning:
    """What Butane asked for, for the checks: file contents by path."""

    butane: str
    ignition: dict
    files: dict[str, bytes] = field(default_factory=dict)


def render_butane(work: Path) -> Provisioning:
    """overlaybd-butane -> the real `butane --strict` -> Ignition JSON (spec 3.3.0, which ignition 2.14 applies)."""
    bu = work / "overlaybd.bu"
    sh(
        [
            str(REPO / ".venv" / "bin" / "overlaybd-butane"),
            "--var",
            "butane_version=1.0.0",
            "--var",
            f"registry_auth=127.0.0.1:5000={REG_USER}:{REG_PASS}",
            "-o",
            str(bu),
        ]
    )
    text = bu.read_text()
    with open(bu) as f:
        res = subprocess.run([str(BUTANE), "--strict"], stdin=f, capture_output=True, text=True)
    assert res.returncode == 0, f"butane --strict rejected overlaybd-butane's config:\n{res.stderr}"
    ign = json.loads(res.stdout)
    (work / "config.ign").write_text(res.stdout)
    files = {}
    for entry in yaml.safe_load(text)["storage"]["files"]:
        inline = (entry.get("contents") or {}).get("inline")
        if inline is not None:
            files[entry["path"]] = inline.encode()
    return Provisioning(text, ign, files)


def decode_data_url(url: str) -> bytes:
    """Contents of an Ignition data: URL (butane may base64 and gzip them)."""
    head, _, data = url.partition(",")
    raw = base64.b64decode(data) if head.endswith(";base64") else urllib.parse.unquote_to_bytes(data)
    return raw


def apply_ignition(work: Path, root: Path) -> str:
    """Debian's real ignition, fetch-offline then files, with the guest root as --root (as the initrd does)."""
    ign = ignition_binary()
    assert ign is not None
    cache, state = work / "ignition-cache.json", work / "ignition-state"
    for p in (cache, state):
        p.unlink(missing_ok=True)
    # Debian builds ignition with SELinux relabeling on: it needs /etc/selinux/config in the root and
    # runs setfiles. The guest has no SELinux, so a setfiles that ignores its input stands in.
    selinux = root / "etc/selinux/config"
    selinux.parent.mkdir(parents=True, exist_ok=True)
    selinux.write_text("SELINUX=disabled\nSELINUXTYPE=targeted\n")
    shim = work / "ignition-bin"
    shim.mkdir(exist_ok=True)
    (shim / "setfiles").write_text("#!/bin/sh\ncat > /dev/null\n")
    (shim / "setfiles").chmod(0o755)
    env = dict(os.environ, IGNITION_CONFIG_FILE=str(work / "config.ign"), PATH=f"{shim}:{os.environ['PATH']}")
    common = ["--platform=file", f"--config-cache={cache}", f"--state-file={state}", "--log-to-stdout"]
    log = ""
    for stage in ("fetch-offline", "files"):
        extra = [f"--neednet={work / 'neednet'}"] if stage == "fetch-offline" else [f"--root={root}"]
        res = subprocess.run([str(ign), f"--stage={stage}", *common, *extra], env=env, capture_output=True, text=True)
        log += res.stdout + res.stderr
        assert res.returncode == 0, f"ignition --stage={stage} failed:\n{log[-4000:]}"
    (work / "ignition.log").write_text(log)
    return log


# --------------------------------------------------------------------------- the guest disk


def install_guest_files(
    root: Path,
    releases: dict[str, Release],
    bundle: Path,
    pub: Path,
    storage: Path,
    prov: Provisioning,
    route: SysupdateRoute | None,
) -> dict[str, str]:
    """Put the test machinery into the staged root; returns the expected values the guest checks against."""
    (root / "usr/lib/os-release").write_text(gi.os_release(V1))
    test_dir = root / "opt/obd-test"
    test_dir.mkdir(parents=True)
    for f in GUEST.iterdir():
        if f.is_file():
            shutil.copy2(f, test_dir / f.name)
    for v in (V1, V2):
        (test_dir / f"os-release-{v}").write_text(gi.os_release(v))
    for unit in (GUEST / "units").iterdir():
        shutil.copy2(unit, root / "etc/systemd/system" / unit.name)
    for unit in ("flatcar-sysext-setup.service", "flatcar-usr-switch.service", "systemd-sysext.service"):
        _enable(root, "sysinit.target", unit)
    _enable(root, "multi-user.target", "obd-test.service")

    # The update server: V1's payload published, V2's held back until the update scenario publishes it.
    for version, where in ((V1, "srv/update"), (V2, "srv/update-later")):
        d = root / where / BOARD / version
        d.mkdir(parents=True)
        shutil.copy2(releases[version].payload, d / "flatcar-overlaybd.gz")
    # The verifier (standing in for ue-rs download_sysext) and the payload key, as Flatcar ships them in /usr.
    key_dir = root / "usr/share/update_engine"
    key_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(pub, key_dir / "update-payload-key.pub.pem")
    ue = root / "opt/obd-ue"
    ue.mkdir(parents=True)
    wrapper = ue / "download_sysext"
    shutil.copytree(bundle, ue / "bundle", symlinks=True)
    wrapper.write_text('#!/bin/sh\nexec /opt/obd-ue/bundle/bin/overlaybd-download-sysext "$@"\n')
    wrapper.chmod(0o755)

    # The registry: the pushed storage, htpasswd auth, access log on.
    reg = root / "var/lib/docker-registry"
    if reg.exists():
        shutil.rmtree(reg)
    shutil.copytree(storage, reg)
    htpasswd = sh(["htpasswd", "-Bbn", REG_USER, REG_PASS]).stdout.strip()
    cfgdir = root / "etc/docker/registry"
    cfgdir.mkdir(parents=True, exist_ok=True)
    (cfgdir / "htpasswd").write_text(htpasswd + "\n")
    (cfgdir / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
        "storage:\n  filesystem:\n    rootdirectory: /var/lib/docker-registry\n"
        "http:\n  addr: 127.0.0.1:5000\n"
        "auth:\n  htpasswd:\n    realm: obd-test\n    path: /etc/docker/registry/htpasswd\n"
    )
    sh(["chroot", str(root), "chown", "-R", "docker-registry:docker-registry", "/var/lib/docker-registry"])

    # Item 3's route: the server publishes both versions, boot 3 installs the first as Ignition would.
    if route is not None:
        srv = root / "srv/update/sysupdate"
        srv.mkdir(parents=True)
        for image in route.images.values():
            shutil.copy2(image, srv / image.name)
        (srv / "SHA256SUMS").write_text(route.sums)
        kit = test_dir / "sysupdate-route"
        kit.mkdir()
        (kit / "overlaybd.transfer").write_bytes(route.transfer)
        first = route.images[SYSUPDATE_VERSIONS[0]]
        shutil.copy2(first, kit / first.name)
        (kit / "link").write_text(f"{route.link[0]} {route.link[1]}\n")

    # The in-guest registry speaks plain HTTP: tell the snapshotter, as an admin of such a registry would
    # (overlaybd-butane has no variable for it). tmpfiles' C line keeps a config that is already there.
    sn_cfg = json.loads((REPO / "usr-etc/snapshotter/config.json").read_text())
    sn_cfg["mirrorRegistry"] = [{"host": "127.0.0.1:5000", "insecure": True}]
    (root / "etc/overlaybd-snapshotter").mkdir(parents=True, exist_ok=True)
    (root / "etc/overlaybd-snapshotter/config.json").write_text(json.dumps(sn_cfg, indent=4) + "\n")

    expected = {
        "V1": V1,
        "V2": V2,
        "RAW1_SHA": releases[V1].raw_sha256,
        "RAW2_SHA": releases[V2].raw_sha256,
        "IMAGE": IMAGE,
        "HELLO": HELLO,
        "CONFIG_TOML_SHA": hashlib.sha256(prov.files["/etc/containerd/config.toml"]).hexdigest(),
        "CRED_SHA": hashlib.sha256(prov.files["/etc/overlaybd/cred.json"]).hexdigest(),
    }
    if route is not None:
        for version, image in route.images.items():
            expected[f"SU_{version.replace('.', '_')}_SHA"] = hashlib.sha256(image.read_bytes()).hexdigest()
        expected["SU_OLD"], expected["SU_NEW"] = SYSUPDATE_VERSIONS
    (test_dir / "expected.env").write_text("".join(f"{k}='{v}'\n" for k, v in expected.items()))
    return expected


def _enable(root: Path, target: str, unit: str) -> None:
    wants = root / "etc/systemd/system" / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    link.unlink(missing_ok=True)
    src = root / "etc/systemd/system" / unit
    link.symlink_to(f"/etc/systemd/system/{unit}" if src.exists() else f"/usr/lib/systemd/system/{unit}")


# --------------------------------------------------------------------------- the run


@dataclass
class Results:
    """Checks by name ("ok" or "FAIL ..."), their logs, facts, and how the run went."""

    checks: dict[str, str]
    logs: dict[str, str]
    facts: dict[str, str]
    consoles: list[str]
    timings: dict[str, float]
    files: Path
    expected: dict[str, str]
    layers: dict[str, int]
    provisioning: Provisioning
    staged_files: dict[str, bytes]
    errors: list[str] = field(default_factory=list)

    def detail(self, name: str) -> str:
        """What to show when a check failed: its log, the boot's script log and console tail."""
        boot = next((b for b in range(1, BOOTS + 1) if (self.files / f"boot{b}" / f"{name}.log").exists()), 0)
        parts = [f"--- {name}.log\n{self.logs.get(name, '(no log)')[-3000:]}"]
        if boot:
            script = self.files / f"boot{boot}" / "script.log"
            if script.exists():
                parts.append(f"--- boot{boot}/script.log (tail)\n{script.read_text(errors='replace')[-2500:]}")
            if boot <= len(self.consoles):
                parts.append(f"--- console of boot {boot} (tail)\n{self.consoles[boot - 1][-1500:]}")
        parts.extend(self.errors)
        return "\n".join(parts)


def run_tier(work: Path) -> Results:
    """Build everything, boot the guest BOOTS times, collect the results."""
    timings: dict[str, float] = {}
    t = time.monotonic()
    root_base = gi.base_root()
    timings["guest_base"] = time.monotonic() - t
    t = time.monotonic()
    key, pub = make_key(work)
    base, releases = build_releases(work, key)
    route = build_sysupdate_route(work, base) if sysupdate_route_available() else None
    timings["sysext_builds"] = time.monotonic() - t
    t = time.monotonic()
    storage, layers = make_registry_storage(work)
    timings["image_convert_push"] = time.monotonic() - t
    t = time.monotonic()
    prov = render_butane(work)
    root = gi.stage_root(work / "root")
    assert root_base.exists()
    apply_ignition(work, root)
    staged = {p: (root / p.lstrip("/")).read_bytes() for p in prov.files if (root / p.lstrip("/")).is_file()}
    expected = install_guest_files(root, releases, base.bundle, pub, storage, prov, route)
    disk = gi.make_disk(root, work / "disk.ext4")
    shutil.rmtree(root)
    timings["disk"] = time.monotonic() - t

    consoles: list[str] = []
    errors: list[str] = []
    results_dir = work / "results"
    for n in range(1, (BOOTS if route else BOOTS - 1) + 1):
        t = time.monotonic()
        try:
            b = gi.boot(disk, work / f"console-{n}.log")
            consoles.append(b.console)
        except gi.GuestError as e:
            errors.append(f"boot {n}: {e}")
            consoles.append((work / f"console-{n}.log").read_text(errors="replace"))
            break
        finally:
            timings[f"boot{n}"] = time.monotonic() - t
        got = gi.read_dir(disk, "/results", work / "results-tmp")
        if not got.is_dir():
            errors.append(f"boot {n}: no /results on the disk; console tail:\n{b.console[-4000:]}")
            break
        if results_dir.exists():
            shutil.rmtree(results_dir)
        shutil.move(got, results_dir)
        done = (results_dir / "done").read_text().split() if (results_dir / "done").exists() else []
        if str(n) not in done[0::2]:
            errors.append(f"boot {n}: the scenario did not run to the end; console tail:\n{b.console[-4000:]}")
            break

    checks: dict[str, str] = {}
    logs: dict[str, str] = {}
    facts: dict[str, str] = {}
    if (results_dir / "results.tsv").exists():
        for line in (results_dir / "results.tsv").read_text().splitlines():
            boot, name, status = (line.split("\t", 2) + ["", ""])[:3]
            checks[name] = status
            log = results_dir / f"boot{boot}" / f"{name}.log"
            logs[name] = log.read_text(errors="replace") if log.exists() else ""
    if (results_dir / "facts.tsv").exists():
        for line in (results_dir / "facts.tsv").read_text().splitlines():
            _, name, value = (line.split("\t", 2) + ["", ""])[:3]
            facts[name] = value
    return Results(checks, logs, facts, consoles, timings, results_dir, expected, layers, prov, staged, errors)
