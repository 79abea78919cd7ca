"""record-trace (upstream `ctr record-trace`): record a container's layer reads, publish them as an acceleration layer.

Flow of `record_trace()`:
1. `ctr run` the (rpulled) image with the snapshotter labels record-trace=yes and
   record-trace-path=<file>: the snapshotter empties the file and (re)attaches the image's top
   layer device with `recordTracePath`, so the image service records every layer read;
2. the command runs (bounded by a timeout), the container and its rootfs are removed;
3. `<trace>.lock` is removed: the image service dumps the trace and creates `<trace>.ok`;
4. the image is copied to an OCI layout (skopeo), the acceleration layer appended to its
   manifest and config, and the result pushed under the new reference (skopeo).

Why here: steps 1-3 drive containerd (`ctr`) and the snapshotter's labels, like rpull; the image
work of step 4 (the acceleration layer's format, rewriting the layout, skopeo) is `oci/`'s.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..format.errors import FormatError
from ..format.trace import read_trace
from ..host.command import HostError, run
from ..oci import annotations as A
from ..oci.acceleration import append_acceleration_layer
from ..oci.layout import Layout, LayoutError
from ..oci.skopeo import SkopeoError, pull_to_layout, push_from_layout

#: how long the image service may take to dump the trace after the lock file is removed
DUMP_TIMEOUT = 30.0


class RecordTraceError(RuntimeError):
    """record-trace failed; the message names the step and the file, container or image concerned."""


@dataclass
class RecordResult:
    """What record_trace did: the trace file and its record count, the command's output, the pushed manifest."""

    trace_path: str
    records: int
    output: str
    timed_out: bool
    manifest_digest: str = ""


def _run(cmd: list[str], what: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    try:
        return run(cmd, what, timeout=timeout)
    except HostError as e:
        raise RecordTraceError(str(e)) from e


def run_recording_container(
    ctr: list[str],
    image: str,
    command: list[str],
    trace_path: str,
    *,
    snapshotter: str = "overlaybd",
    timeout: float = 60.0,
) -> tuple[str, bool]:
    """`ctr run --rm` the image with the record-trace labels; SIGKILL it after `timeout` seconds.

    Returns (output, timed_out). The container and its rootfs snapshot are gone on return.
    """
    cid = "record-trace-" + secrets.token_hex(4)
    cmd = [
        *ctr,
        "run",
        "--rm",
        "--snapshotter",
        snapshotter,
        "--snapshotter-label",
        f"{A.RECORD_TRACE}=yes",
        "--snapshotter-label",
        f"{A.RECORD_TRACE_PATH}={trace_path}",
        image,
        cid,
        *command,
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        subprocess.run([*ctr, "task", "kill", "-s", "SIGKILL", cid], capture_output=True, timeout=60)
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
    finally:
        # whatever happened to `ctr run`, leave no task or container (and so no rootfs) behind
        subprocess.run([*ctr, "task", "delete", "--force", cid], capture_output=True, timeout=60)
        subprocess.run([*ctr, "container", "rm", cid], capture_output=True, timeout=60)
    if p.returncode != 0 and not timed_out:
        raise RecordTraceError(f"container {cid} of {image}: ctr run exited {p.returncode}: {err.strip()}")
    return out, timed_out


def collect_garbage(ctr: list[str]) -> None:
    """Run containerd's GC now (deleting a lease with --sync does): containerd removes the backend snapshots of
    deleted containers only in GC, and until then they count as users of the image's device."""
    r = _run([*ctr, "leases", "create"], "create a lease", timeout=60)
    _run([*ctr, "leases", "delete", "--sync", r.stdout.split()[0]], "containerd garbage collection", timeout=120)


def finish_recording(trace_path: str, timeout: float = DUMP_TIMEOUT) -> int:
    """Remove `<trace>.lock` so the image service dumps the trace; wait for `<trace>.ok`; returns the record count."""
    lock, ok = trace_path + ".lock", trace_path + ".ok"
    if not os.path.exists(ok):
        try:
            os.unlink(lock)
        except FileNotFoundError:
            raise RecordTraceError(
                f"{lock} does not exist: the image service did not record (see its log); was the "
                "image pulled with rpull?"
            ) from None
        end = time.monotonic() + timeout
        while not os.path.exists(ok):
            if time.monotonic() > end:
                raise RecordTraceError(f"{ok} did not appear within {timeout:.0f}s after removing {lock}")
            time.sleep(0.1)
    try:
        records = read_trace(trace_path)
    except FormatError as e:
        raise RecordTraceError(str(e)) from e
    if not records:
        raise RecordTraceError(f"{trace_path}: the trace has no records (the container read nothing from the image)")
    return len(records)


def publish_with_acceleration_layer(
    image: str, new_ref: str, trace: bytes, work_dir: str, *, plain_http: bool = False, skopeo: str = "skopeo"
) -> str:
    """Copy `image` into an OCI layout, append the acceleration layer, push it as `new_ref`; returns its digest."""
    layout = Path(work_dir) / "layout"
    try:
        # through skopeo's dir: transport, so Docker v2 images (the convertor's default) keep their digests
        pull_to_layout(f"docker://{image}", str(layout), "src", work_dir, insecure=plain_http, skopeo=skopeo)
        mdigest = append_acceleration_layer(Layout(layout), "src", "accel", trace)
        push_from_layout(str(layout), "accel", f"docker://{new_ref}", work_dir, insecure=plain_http, skopeo=skopeo)
    except (SkopeoError, LayoutError) as e:
        raise RecordTraceError(f"publish {new_ref}: {e}") from e
    return mdigest


def record_trace(
    image: str,
    new_ref: str,
    command: list[str],
    *,
    address: str,
    work_dir: str,
    trace_dir: str,
    namespace: str = "default",
    snapshotter: str = "overlaybd",
    plain_http: bool = False,
    timeout: float = 60.0,
    ctr: str = "ctr",
    skopeo: str = "skopeo",
) -> RecordResult:
    """Record `command` running in `image` (already rpulled) and push `image` + acceleration layer as `new_ref`.

    The image service writes the trace into `trace_dir` (the snapshotter's `traceDir`: the only place a
    record-trace-path label may point), in a directory of its own; it ends up as `<work_dir>/trace`."""
    if not command:
        raise RecordTraceError("no command to run in the container")
    os.makedirs(work_dir, exist_ok=True)
    try:
        os.makedirs(trace_dir, mode=0o700, exist_ok=True)
        rec_dir = tempfile.mkdtemp(prefix="record-", dir=trace_dir)
    except OSError as e:
        raise RecordTraceError(f"trace directory {trace_dir}: {e.strerror}") from e
    try:
        recorded = os.path.join(rec_dir, "trace")
        ctr_cmd = [ctr, "--address", address, "--namespace", namespace]
        collect_garbage(ctr_cmd)
        output, timed_out = run_recording_container(
            ctr_cmd, image, command, recorded, snapshotter=snapshotter, timeout=timeout
        )
        records = finish_recording(recorded)
        with open(recorded, "rb") as f:
            trace = f.read()
    finally:
        shutil.rmtree(rec_dir, ignore_errors=True)
    trace_path = os.path.abspath(os.path.join(work_dir, "trace"))
    with open(trace_path, "wb") as f:
        f.write(trace)
    result = RecordResult(trace_path, records, output, timed_out)
    result.manifest_digest = publish_with_acceleration_layer(
        image, new_ref, trace, work_dir, plain_http=plain_http, skopeo=skopeo
    )
    return result


def describe(result: RecordResult) -> dict[str, Any]:
    return {
        "trace": result.trace_path,
        "records": result.records,
        "timedOut": result.timed_out,
        "manifest": result.manifest_digest,
    }
