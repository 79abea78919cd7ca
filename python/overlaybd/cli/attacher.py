"""`overlaybd-attacher attach --id ID --config CONFIG [--with-devid] [-v]` / `detach --id ID [-v]` (upstream flags).

Attach an overlaybd image (config.v1.json) as a block device outside containerd, and print the device.
It asks the running overlaybd-tcmu the way the snapshotter does: through TCMU (configfs backstore
`user_999999999/dev_<ID>` exported by tcm_loop as /dev/sdX, upstream's default tenant) where the kernel
has it, else through the daemon's FUSE frontend (control socket; a loop device). Attach is tried 5 times,
one second apart, as upstream; a failure names the config and the reason from its result file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from .toolrun import ToolError, parser, run

TOOL = "overlaybd-attacher"
ATTEMPTS = 5
#: upstream's default tenant: HBA and NAA prefix of the LIO objects
HBA, NAA_PREFIX = 999999999, "199"


def main(argv: list[str] | None = None) -> int:
    p = parser(TOOL, "Attach/detach overlaybd devices.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{attach,detach}")
    a = sub.add_parser("attach", help="attach an overlaybd device with given ID and configuration")
    a.add_argument("--id", required=True, help="device ID (snapshot ID)")
    a.add_argument("--config", required=True, help="config.v1.json of the image")
    a.add_argument("-v", "--verbose", action="store_true", help="verbose logging")
    a.add_argument("--with-devid", action="store_true", help="include the ID in dev_config (TCMU)")
    a.add_argument("--fuse-socket", default=None, help="FUSE frontend control socket (ours; no TCMU)")
    d = sub.add_parser("detach", help="detach an overlaybd device with given ID")
    d.add_argument("--id", required=True, help="device ID (snapshot ID)")
    d.add_argument("-v", "--verbose", action="store_true", help="verbose logging")
    d.add_argument("--fuse-socket", default=None, help="FUSE frontend control socket (ours; no TCMU)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run(TOOL, lambda: attach(args) if args.command == "attach" else detach(args))


def _check_id(dev_id: str) -> str:
    if not dev_id or "/" in dev_id or dev_id.startswith(".") or len(dev_id) > 128:
        raise ToolError(f"--id {dev_id!r}: must be a non-empty name without '/'")
    return dev_id


def result_file(config_path: str, config: dict) -> str:
    """The config's resultFile (relative to the config's directory), else init-debug.log beside it (upstream)."""
    rf = config.get("resultFile") or "init-debug.log"
    return rf if os.path.isabs(rf) else os.path.join(os.path.dirname(config_path), rf)


def _reason(path: str) -> str:
    try:
        with open(path) as f:
            text = f.read(4096).strip()
    except OSError:
        return ""
    return "" if text in ("", "success") else text


def _tcmu() -> bool:
    from ..tcmu.configfs import tcmu_available

    return tcmu_available(modprobe=False)[0]


def _socket(args: argparse.Namespace) -> str:
    from ..fuse.control import DEFAULT_SOCKET

    return args.fuse_socket or DEFAULT_SOCKET


def attach(args: argparse.Namespace) -> int:
    dev_id = _check_id(args.id)
    path = os.path.abspath(args.config)
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as e:
        raise ToolError(f"config file does not exist: {path}: {e.strerror}") from e
    except ValueError as e:
        raise ToolError(f"{path}: invalid JSON config file: {e}") from e
    if not isinstance(config, dict):
        raise ToolError(f"{path}: invalid JSON config file: not an object")
    result = result_file(path, config)
    use_tcmu = _tcmu()
    last = ""
    for attempt in range(1, ATTEMPTS + 1):
        if attempt > 1:
            logging.warning("retry attempt %d/%d after error: %s", attempt, ATTEMPTS, last)
            time.sleep(1)
        try:
            device = (
                _attach_tcmu(dev_id, path, args.with_devid)
                if use_tcmu
                else _attach_fuse(dev_id, path, "upper" not in config, _socket(args))
            )
        except (OSError, RuntimeError, ValueError) as e:
            reason = _reason(result)
            last = f"{e}" + (f" ({reason})" if reason and reason not in str(e) else "")
            continue
        print(device)
        return 0
    raise ToolError(f"failed to attach device for {path} after {ATTEMPTS} attempts: {last}")


def _attach_tcmu(dev_id: str, config: str, with_devid: bool) -> str:
    from ..tcmu import configfs

    dev = f"dev_{dev_id}"
    wwn = configfs.naa_wwn(dev_id, NAA_PREFIX)
    try:
        configfs.create_backstore(dev, config, dev_id if with_devid else "", hba=HBA)
        return configfs.attach_loop(dev, hba=HBA, wwn=wwn)
    except (OSError, configfs.ConfigfsError) as e:
        _detach_tcmu(dev_id)
        raise RuntimeError(f"TCMU: {e}") from e


def _attach_fuse(dev_id: str, config: str, read_only: bool, socket: str) -> str:
    from ..fuse.control import request

    try:
        reply = request({"op": "attach", "config": config, "dev_id": _fuse_id(dev_id), "read_only": read_only}, socket)
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"overlaybd-tcmu's FUSE frontend at {socket} is not reachable (is overlaybd-tcmu running?): {e}"
        ) from e
    return str(reply["device"])


def _fuse_id(dev_id: str) -> str:
    return f"attacher-{dev_id}"


def _detach_tcmu(dev_id: str) -> bool:
    """Remove the LIO objects of `dev_id`; False when there were none."""
    from ..tcmu import configfs

    dev = f"dev_{dev_id}"
    wwn = configfs.naa_wwn(dev_id, NAA_PREFIX)
    found = os.path.isdir(configfs.backstore_path(HBA, dev)) or os.path.isdir(f"{configfs.CONFIGFS}/loopback/{wwn}")
    configfs.detach_loop(dev, wwn=wwn)
    configfs.remove_backstore(dev, hba=HBA)
    return found


def detach(args: argparse.Namespace) -> int:
    from ..fuse.control import request
    from ..tcmu.configfs import ConfigfsError

    dev_id = _check_id(args.id)
    if _tcmu():
        try:
            if _detach_tcmu(dev_id):
                return 0
        except (OSError, ConfigfsError) as e:
            raise ToolError(f"failed to detach device {dev_id}: {e}") from e
    socket = _socket(args)
    try:
        request({"op": "detach", "dev_id": _fuse_id(dev_id)}, socket)
    except (OSError, ValueError) as e:
        raise ToolError(f"failed to detach device {dev_id}: FUSE frontend at {socket} not reachable: {e}") from e
    except RuntimeError as e:
        raise ToolError(f"failed to detach device {dev_id}: {e}") from e
    return 0
