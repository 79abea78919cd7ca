"""The daemon's answers to TCM-USER netlink events (the kernel side runs in tests/vm).

The netlink socket is replaced by a list of events and a list of replies; the decisions are real.
"""

from __future__ import annotations

import errno

from overlaybd.daemon.main import choose_frontend
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
    kind, why = choose_frontend("auto")
    assert kind in ("tcmu", "fuse") and why
