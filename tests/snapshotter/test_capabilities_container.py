"""File capabilities survive conversion, checked in a real container (issue 11).

An image made of the host's own binaries carries `/usr/bin/ping` with `security.capability` =
cap_net_raw+ep (a `SCHILY.xattr` pax record) and no setuid bit, plus `/usr/bin/ping-nocap`, the same
bytes without the xattr. In a container a non-root user (setpriv) can ping only through the file
capability: the container's fresh network namespace has `ping_group_range` "1 0" (no ICMP datagram
sockets), so ping needs a raw socket. The nocap copy failing with "Operation not permitted" in the
same container proves the capability is what makes the difference. The image runs converted to
overlaybd (overlaybd-convert -> docker-registry -> rpull -> ctr run --snapshotter overlaybd) and, as
the reference, as the original image on containerd's own overlayfs snapshotter; both must agree.

The encoding the layer uses is checked against what `setcap` stores. The last test pulls with the
sysext's `snapshotter/ctr rpull -u USER:PASS` from a registry that requires htpasswd Basic auth
(the daemon reading the same credentials from overlaybd.json's cred.json) and runs the image.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.containerd_stack import Stack, rpull
from helpers.oci_images import BUSYBOX, write_layout
from helpers.registry import Registry as AuthRegistry
from overlaybd.cli.convert import main as convert_main

pytestmark = [pytest.mark.containerd, pytest.mark.registry]

PING = "/usr/bin/ping"
GETCAP = shutil.which("getcap", path="/usr/sbin:/sbin:/usr/bin") or "/usr/sbin/getcap"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
MULTICALL = Path(sys.executable).parent / "overlaybd"

CAP_NET_RAW = 13
VFS_CAP_REVISION_2 = 0x02000000
VFS_CAP_FLAGS_EFFECTIVE = 0x000001
#: struct vfs_cap_data (revision 2): magic_etc, then {permitted, inheritable} for the low and high 32 caps
CAP_NET_RAW_EP = struct.pack("<5I", VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, 1 << CAP_NET_RAW, 0, 0, 0)

#: what the container runs: getcap, then ping as uid 1000 with and without the file capability
SCRIPT = (
    "echo range=$(cat /proc/sys/net/ipv4/ping_group_range); "
    "/usr/bin/setpriv --reuid=1000 --regid=1000 --clear-groups /bin/id; "
    "/usr/sbin/getcap /usr/bin/ping /usr/bin/ping-nocap; "
    "for p in ping ping-nocap; do "
    "/usr/bin/setpriv --reuid=1000 --regid=1000 --clear-groups /usr/bin/$p -c1 -W5 127.0.0.1 2>&1; "
    'echo "$p rc=$?"; done'
)


def _need(*paths: str) -> None:
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        pytest.skip(f"missing on the host: {', '.join(missing)} (iputils-ping, libcap2-bin, util-linux)")


def _libs(binaries: list[str]) -> set[str]:
    """The shared libraries (and the loader) the binaries need, as ldd names them."""
    out: set[str] = set()
    for b in binaries:
        for line in subprocess.run(["ldd", b], capture_output=True, text=True, check=True).stdout.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                out.add(m.group(1))
    return out


def caps_layer() -> bytes:
    """One uncompressed layer: busybox sh, ping (cap_net_raw+ep, mode 0755), ping-nocap, getcap, setpriv, libs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs: set[str] = set()

        def add(name: str, data: bytes = b"", mode: int = 0o644, **kw: object) -> None:
            parts = name.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
                    tf.addfile(ti)
            ti = tarfile.TarInfo(name)
            ti.mode, ti.size = mode, len(data)
            for k, v in kw.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if ti.type == tarfile.REGTYPE else None)

        for d in ("proc/", "sys/", "dev/", "tmp/", "etc/"):
            add(d + ".keep")
        add("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
        for applet in ("sh", "cat", "echo", "id", "true"):
            add(f"bin/{applet}", type=tarfile.SYMTYPE, linkname="busybox")
        ping = Path(PING).read_bytes()
        # no setuid bit: only the file capability can grant the raw socket
        add("usr/bin/ping", ping, 0o755, pax_headers={"SCHILY.xattr.security.capability": CAP_NET_RAW_EP.decode()})
        add("usr/bin/ping-nocap", ping, 0o755)
        add("usr/sbin/getcap", Path(GETCAP).read_bytes(), 0o755)
        add("usr/bin/setpriv", Path(SETPRIV).read_bytes(), 0o755)
        for lib in sorted(_libs([PING, GETCAP, SETPRIV])):
            add(lib.lstrip("/"), Path(lib).read_bytes(), 0o755)
        add("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/tmp:/bin/sh\n")
        add("etc/group", b"root:x:0:\nuser:x:1000:\n")
    return buf.getvalue()


def test_capability_encoding_is_what_setcap_writes(tmp_path: Path) -> None:
    """The xattr the layer carries is byte for byte what `setcap cap_net_raw+ep` stores."""
    setcap = shutil.which("setcap", path="/usr/sbin:/sbin:/usr/bin")
    if setcap is None:
        pytest.skip("setcap (libcap2-bin) missing")
    f = tmp_path / "f"
    f.write_bytes(b"x")
    subprocess.run([setcap, "cap_net_raw+ep", str(f)], check=True, capture_output=True)
    assert os.getxattr(f, "security.capability") == CAP_NET_RAW_EP


@pytest.fixture(scope="module")
def source_layout() -> Iterator[Path]:
    """The original OCI image (gzip layer) in a layout, built once for the module."""
    _need(PING, GETCAP, SETPRIV, BUSYBOX)
    d = Path(tempfile.mkdtemp(prefix="obdcaps-", dir="/tmp"))
    write_layout(d / "src", "localhost/caps/ping:1", [caps_layer()])
    yield d
    shutil.rmtree(d, ignore_errors=True)


def convert(src: str, dst: str, work: Path, *flags: str) -> None:
    """overlaybd-convert SRC DST (skopeo-style references), scratch in `work`."""
    args = [src, dst, "--vsize", "1", "--work-dir", str(work), *flags]
    assert convert_main(args) == 0


def run_script(stack: Stack, ref: str, name: str, snapshotter: str) -> str:
    """`ctr run --rm` of SCRIPT with containerd's default spec (CAP_NET_RAW in the bounding set, new netns)."""
    r = stack.ctr("run", "--rm", "--snapshotter", snapshotter, ref, name, "/bin/sh", "-c", SCRIPT, timeout=120)
    return r.stdout


def check_output(out: str) -> None:
    """getcap shows the capability; uid 1000 pings only with it (the ICMP datagram path is closed)."""
    assert "range=1 0" in out, out  # no ICMP datagram sockets for anyone: ping must use a raw socket
    assert re.search(r"^/usr/bin/ping cap_net_raw[=+]ep$", out, re.M), out
    assert not re.search(r"^/usr/bin/ping-nocap ", out, re.M), out
    assert "1 packets transmitted, 1 received" in out and "ping rc=0" in out, out
    assert "uid=1000(user) gid=1000(user)" in out, out  # setpriv really drops root
    assert "ping-nocap rc=0" not in out and "ping-nocap: socket: Operation not permitted" in out, out


def test_ping_capability_in_container(lazy_stack: Stack, registry, source_layout: Path, tmp_path, cname) -> None:
    """Converted image on overlaybd == original image on overlayfs: getcap and non-root ping work."""
    src = source_layout / "src"
    plain = registry.push_layout(src, "1", "caps/ping:1")
    obd = f"{registry.host}/caps/ping:1-obd"
    # registry to registry, upstream convertor's default Docker v2 manifest
    convert(f"docker://{plain}", f"docker://{obd}", tmp_path, "--insecure")

    rpull(lazy_stack, obd)
    out_obd = run_script(lazy_stack, obd, cname, "overlaybd")
    check_output(out_obd)

    lazy_stack.ctr("image", "pull", "--plain-http", plain)  # containerd's own overlayfs snapshotter
    out_ovl = run_script(lazy_stack, plain, cname + "o", "overlayfs")
    check_output(out_ovl)
    strip = re.compile(r"time=\S+|rtt .*|\d+ms|, time \d+ms")
    assert strip.sub("", out_obd) == strip.sub("", out_ovl)


def test_ctr_rpull_with_user_then_run(stack_factory, source_layout: Path, tmp_path: Path, cname: str) -> None:
    """The sysext's `snapshotter/ctr rpull -u USER:PASS` against an htpasswd registry, then ctr run."""
    converted = tmp_path / "dst"
    convert(f"oci:{source_layout / 'src'}", f"oci:{converted}:obd", tmp_path, "--oci")
    reg = AuthRegistry(tmp_path / "reg", auth="htpasswd", users={"alice": "s3cret"})
    try:
        reg.push(converted, "obd", "caps/ping", creds="alice:s3cret")
        ref = f"{reg.host}/caps/ping:obd"
        s = stack_factory({"mirrorRegistry": [{"host": reg.host, "insecure": True}]}, start=False)
        s.start_daemon()
        # the daemon fetches blobs with overlaybd.json's credentialConfig file, as on Flatcar
        auth = base64.b64encode(b"alice:s3cret").decode()
        (s.base / "cred.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        s.start_snapshotter()
        s.start_containerd()

        snapdir = tmp_path / "snapshotter"
        snapdir.mkdir()
        (snapdir / "ctr").symlink_to(MULTICALL)
        # rpull's own credential source knows nothing of this registry: only -u can let it in
        nocred = tmp_path / "nocred.json"
        nocred.write_text('{"auths": {}}')
        svc = tmp_path / "overlaybd.json"
        svc.write_text(json.dumps({"credentialConfig": {"mode": "file", "path": str(nocred)}}))
        base = [str(snapdir / "ctr"), "-a", str(s.sock), "rpull", "--service_config_path", str(svc), "--plain-http"]
        denied = subprocess.run([*base, ref], capture_output=True, text=True, timeout=120)
        assert denied.returncode != 0 and "HTTP 401" in denied.stderr, denied.stderr
        r = subprocess.run([*base, "-u", "alice:s3cret", ref], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{r.stderr}\n--- snapshotter ---\n{s.log('snapshotter')}"
        out = run_script(s, ref, cname, "overlaybd")
        check_output(out)
    finally:
        reg.close()
