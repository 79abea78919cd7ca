"""The daemon's answers to TCM-USER netlink events (the kernel side runs in tests/vm).

The netlink socket is replaced by a list of events and a list of replies; the decisions are real.
"""

from __future__ import annotations

import errno
import os

import pytest
from overlaybd.daemon.main import choose_frontend
from overlaybd.tcmu import configfs
from overlaybd.tcmu import netlink as nl
from overlaybd.tcmu.frontend import TcmuFrontend


class FakeNetlink:
    def __init__(self, events):
        self.events = events
        self.replies = []

    def receive(self):
        return self.events

    def reply(self, ev, status):
        self.replies.append((ev.device, status))


def ev(cmd, device, minor=0):
    return nl.DeviceEvent(cmd, device, minor, minor + 100, {})


def test_replies():
    opened, closed = [], []
    fe = TcmuFrontend(opener=lambda p: None)

    def open_device(minor, cfg):
        if cfg.config_path.endswith("bad.json"):
            raise OSError(errno.ENOENT, "lowers[0]: missing")
        opened.append((minor, cfg.config_path, cfg.dev_id))

    fe.open_device = open_device
    fe.close_device = lambda minor: closed.append(minor)
    good = "tcm-user/999999999/dev_1/overlaybd//x/config.v1.json;1"
    fe.netlink = FakeNetlink(
        [
            ev(nl.CMD_ADDED_DEVICE, good, 0),
            ev(nl.CMD_ADDED_DEVICE, "tcm-user/999999999/dev_2/overlaybd//x/bad.json;2", 1),
            ev(nl.CMD_ADDED_DEVICE, "tcm-user/0/other/glfs/vol@host/file", 2),
            ev(nl.CMD_RECONFIG_DEVICE, good, 0),
            ev(nl.CMD_REMOVED_DEVICE, good, 0),
        ]
    )
    fe.handle_events()
    assert opened == [(0, "/x/config.v1.json", "1")] and closed == [0]
    assert fe.netlink.replies == [
        (good, 0),
        ("tcm-user/999999999/dev_2/overlaybd//x/bad.json;2", -errno.EPERM),
        (good, -errno.EOPNOTSUPP),
        (good, 0),
    ]  # the glfs device belongs to another handler: no reply from us


def test_forced_frontend():
    assert choose_frontend("fuse") == ("fuse", "requested")
    assert choose_frontend("tcmu") == ("tcmu", "requested")


def test_auto_frontend_on_this_host():
    """What this host must get: TCMU only with target_core_user loaded and configfs mounted (read after the
    choice, which may have loaded the module), and the reason names what is missing."""
    kind, why = choose_frontend("auto")
    module = os.path.isdir("/sys/module/target_core_user")
    core = os.path.isdir(f"{configfs.CONFIGFS}/core")
    if not module:
        assert (kind, why) == ("fuse", "kernel module target_core_user not loaded (modprobe failed)")
    elif not core:
        assert (kind, why) == ("fuse", f"{configfs.CONFIGFS}/core missing (configfs not mounted?)")
    else:
        assert (kind, why) == ("tcmu", "target_core_user loaded")


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        ({"/sys/module/target_core_user", f"{configfs.CONFIGFS}/core"}, ("tcmu", "target_core_user loaded")),
        ({f"{configfs.CONFIGFS}/core"}, ("fuse", "kernel module target_core_user not loaded (modprobe failed)")),
        ({"/sys/module/target_core_user"}, ("fuse", f"{configfs.CONFIGFS}/core missing (configfs not mounted?)")),
    ],
)
def test_auto_frontend_decision(monkeypatch, present, expected):
    """Each host shape gets its frontend and reason; a missing module is modprobed first (here: to no avail)."""
    modprobes = []
    monkeypatch.setattr(configfs.os.path, "isdir", lambda p: p in present)
    monkeypatch.setattr(configfs.subprocess, "run", lambda argv, **kw: modprobes.append(argv))
    assert choose_frontend("auto") == expected
    module_missing = "/sys/module/target_core_user" not in present
    assert modprobes == ([["modprobe", "target_core_user"]] if module_missing else [])
