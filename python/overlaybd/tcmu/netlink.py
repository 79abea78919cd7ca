"""The TCM-USER generic-netlink family: the kernel announces devices; we answer so `enable` waits for us.

Kernel side: drivers/target/target_core_user.c. On `echo 1 > enable` the kernel multicasts
TCMU_CMD_ADDED_DEVICE (attrs DEVICE = uio name "tcm-user/<hba>/<dev>/<cfgstring>", MINOR,
DEVICE_ID) on group "config". If a listener said SET_FEATURES(SUPP_KERN_CMD_REPLY=1), the write
to `enable` blocks until ADDED_DEVICE_DONE arrives with CMD_STATUS (0 or -errno), so a failed
open fails the enable instead of leaving a dead device behind.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass

log = logging.getLogger(__name__)

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_NO_ENOBUFS = 5
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLMSG_DONE = 3

FAMILY = "TCM-USER"
FAMILY_VERSION = 2
GROUP = "config"

# enum tcmu_genl_cmd
CMD_ADDED_DEVICE = 1
CMD_REMOVED_DEVICE = 2
CMD_RECONFIG_DEVICE = 3
CMD_ADDED_DEVICE_DONE = 4
CMD_REMOVED_DEVICE_DONE = 5
CMD_RECONFIG_DEVICE_DONE = 6
CMD_SET_FEATURES = 7
DONE_FOR = {
    CMD_ADDED_DEVICE: CMD_ADDED_DEVICE_DONE,
    CMD_REMOVED_DEVICE: CMD_REMOVED_DEVICE_DONE,
    CMD_RECONFIG_DEVICE: CMD_RECONFIG_DEVICE_DONE,
}

# enum tcmu_genl_attr
ATTR_DEVICE = 1
ATTR_MINOR = 2
ATTR_DEV_CFG = 4
ATTR_DEV_SIZE = 5
ATTR_WRITECACHE = 6
ATTR_CMD_STATUS = 7
ATTR_DEVICE_ID = 8
ATTR_SUPP_KERN_CMD_REPLY = 9

NLMSGHDR = struct.Struct("=IHHII")
GENLMSGHDR = struct.Struct("=BBH")
NLATTR = struct.Struct("=HH")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = NLATTR.pack(NLATTR.size + len(payload), kind) + payload
    return raw.ljust(_align4(len(raw)), b"\0")


def parse_attrs(data: bytes | memoryview) -> dict[int, bytes]:
    """Netlink attributes -> {type: payload}; stops at a malformed length instead of looping."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, pos)
        if length < NLATTR.size or pos + length > len(data):
            break
        out[kind & 0x3FFF] = bytes(data[pos + NLATTR.size : pos + length])
        pos += _align4(length)
    return out


def genl_message(family: int, cmd: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST, version: int = 1) -> bytes:
    body = GENLMSGHDR.pack(cmd, version, 0) + attrs
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), family, flags, seq, 0) + body


def parse_messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split a datagram into (nlmsg_type, seq, genl cmd or errno, payload after the genl header)."""
    out = []
    pos = 0
    while pos + NLMSGHDR.size <= len(data):
        length, mtype, _flags, seq, _pid = NLMSGHDR.unpack_from(data, pos)
        if length < NLMSGHDR.size or pos + length > len(data):
            break
        body = data[pos + NLMSGHDR.size : pos + length]
        if mtype == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", body, 0)
            out.append((mtype, seq, err, b""))
        elif mtype != NLMSG_DONE and len(body) >= GENLMSGHDR.size:
            out.append((mtype, seq, body[0], body[GENLMSGHDR.size :]))
        pos += _align4(length)
    return out


@dataclass
class DeviceEvent:
    """An ADDED/REMOVED/RECONFIG notification."""

    cmd: int
    device: str  # uio name: tcm-user/<hba>/<dev>/<cfgstring>
    minor: int
    device_id: int
    attrs: dict[int, bytes]


class TcmuNetlink:
    """A generic-netlink socket joined to TCM-USER's "config" group."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
        self.sock.bind((0, 0))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
        except OSError:
            pass
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.seq = 0
        self.family = -1
        self.pending: list[DeviceEvent] = []  # events that arrived while we waited for an ack
        self.family, groups = self._resolve()
        if GROUP not in groups:
            raise OSError(errno.ENOENT, f"netlink family {FAMILY}: no multicast group {GROUP!r}")
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, groups[GROUP])

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _request(self, family: int, cmd: int, attrs: bytes, version: int) -> list[tuple[int, int, int, bytes]]:
        seq = self._next_seq()
        self.sock.send(genl_message(family, cmd, attrs, seq, NLM_F_REQUEST | NLM_F_ACK, version))
        replies: list[tuple[int, int, int, bytes]] = []
        while True:
            for msg in parse_messages(self.sock.recv(65536)):
                if msg[1] != seq:
                    self.pending.extend(self._events([msg]))
                    continue
                if msg[0] == NLMSG_ERROR:
                    if msg[2]:
                        raise OSError(-msg[2], f"netlink cmd {cmd}: {os.strerror(-msg[2])}")
                    return replies
                replies.append(msg)

    def _resolve(self) -> tuple[int, dict[str, int]]:
        name = attr(CTRL_ATTR_FAMILY_NAME, FAMILY.encode() + b"\0")
        try:
            replies = self._request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, name, 1)
        except OSError as e:
            raise OSError(e.errno, f"netlink family {FAMILY} not found (target_core_user not loaded?)") from e
        attrs = parse_attrs(replies[0][3])
        family = struct.unpack("=H", attrs[CTRL_ATTR_FAMILY_ID][:2])[0]
        groups: dict[str, int] = {}
        for g in parse_attrs(attrs.get(CTRL_ATTR_MCAST_GROUPS, b"")).values():
            ga = parse_attrs(g)
            groups[ga[CTRL_ATTR_MCAST_GRP_NAME].rstrip(b"\0").decode()] = struct.unpack(
                "=I", ga[CTRL_ATTR_MCAST_GRP_ID][:4]
            )[0]
        return family, groups

    def enable_replies(self) -> None:
        """Ask the kernel to wait for our *_DONE replies (so enable reports our open result)."""
        self._request(self.family, CMD_SET_FEATURES, attr(ATTR_SUPP_KERN_CMD_REPLY, b"\1"), FAMILY_VERSION)

    def receive(self) -> list[DeviceEvent]:
        """Block for the next datagram; return the device events in it."""
        if self.pending:
            events, self.pending = self.pending, []
            return events
        return self._events(parse_messages(self.sock.recv(65536)))

    def _events(self, msgs: list[tuple[int, int, int, bytes]]) -> list[DeviceEvent]:
        events = []
        for mtype, _seq, cmd, payload in msgs:
            if mtype != self.family or cmd not in DONE_FOR:
                continue
            a = parse_attrs(payload)
            device = a.get(ATTR_DEVICE, b"").rstrip(b"\0").decode(errors="replace")
            minor = struct.unpack("=I", a[ATTR_MINOR][:4])[0] if ATTR_MINOR in a else -1
            dev_id = struct.unpack("=I", a[ATTR_DEVICE_ID][:4])[0] if ATTR_DEVICE_ID in a else 0
            events.append(DeviceEvent(cmd, device, minor, dev_id, a))
        return events

    def reply(self, event: DeviceEvent, status: int) -> None:
        """Send the *_DONE for an event with status 0 or -errno."""
        attrs = attr(ATTR_CMD_STATUS, struct.pack("=i", status))
        attrs += attr(ATTR_DEVICE_ID, struct.pack("=I", event.device_id))
        self._request(self.family, DONE_FOR[event.cmd], attrs, FAMILY_VERSION)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
