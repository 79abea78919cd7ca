"""Pure parts of the kernel interfaces: netlink message coding, cfgstring parsing, configfs scan."""

from __future__ import annotations

import struct

from overlaybd.tcmu import configfs
from overlaybd.tcmu import netlink as nl


def test_attr_padding_and_roundtrip():
    a = nl.attr(nl.ATTR_DEVICE, b"tcm-user/1/d/overlaybd//x.json\0")
    assert len(a) % 4 == 0 and struct.unpack_from("=HH", a) == (4 + 31, nl.ATTR_DEVICE)
    both = a + nl.attr(nl.ATTR_MINOR, struct.pack("=I", 7))
    parsed = nl.parse_attrs(both)
    assert parsed[nl.ATTR_DEVICE].rstrip(b"\0") == b"tcm-user/1/d/overlaybd//x.json"
    assert struct.unpack("=I", parsed[nl.ATTR_MINOR]) == (7,)


def test_malformed_attrs_stop_instead_of_looping():
    assert nl.parse_attrs(struct.pack("=HH", 2, 1) + b"xxxx") == {}  # nla_len < header
    assert nl.parse_attrs(struct.pack("=HH", 200, 1) + b"xxxx") == {}  # past the end


def test_message_framing():
    msg = nl.genl_message(0x1A, nl.CMD_ADDED_DEVICE_DONE, nl.attr(nl.ATTR_CMD_STATUS, struct.pack("=i", -1)), 9)
    length, mtype, flags, seq, _pid = nl.NLMSGHDR.unpack_from(msg)
    assert length == len(msg) and mtype == 0x1A and flags == nl.NLM_F_REQUEST and seq == 9
    [(t, s, cmd, payload)] = nl.parse_messages(msg)
    assert (t, s, cmd) == (0x1A, 9, nl.CMD_ADDED_DEVICE_DONE)
    assert struct.unpack("=i", nl.parse_attrs(payload)[nl.ATTR_CMD_STATUS]) == (-1,)
    err = nl.NLMSGHDR.pack(36, nl.NLMSG_ERROR, 0, 4, 0) + struct.pack("=i", -1) + bytes(16)
    assert nl.parse_messages(err) == [(nl.NLMSG_ERROR, 4, -1, b"")]
    assert nl.parse_messages(b"\x05\0\0\0") == []


def test_cfgstring_parsing():
    c = configfs.parse_uio_name("tcm-user/999999999/dev_12/overlaybd//var/lib/x/config.v1.json;12")
    assert (c.hba, c.dev, c.subtype, c.config_path, c.dev_id) == (
        "999999999",
        "dev_12",
        "overlaybd",
        "/var/lib/x/config.v1.json",
        "12",
    )
    c = configfs.parse_uio_name("tcm-user/0/t/overlaybd//a.json")
    assert c.config_path == "/a.json" and c.dev_id == ""
    assert configfs.parse_uio_name("uio_pci_generic") is None
    assert configfs.parse_uio_name("tcm-user/0/t/feas/test").subtype == "feas"


def test_scan_finds_only_our_subtype(tmp_path):
    for i, name in enumerate(["tcm-user/1/a/overlaybd//c.json;1", "tcm-user/1/b/other/x", "something"]):
        d = tmp_path / f"uio{i}"
        d.mkdir()
        (d / "name").write_text(name + "\n")
    found = configfs.scan(str(tmp_path))
    assert [(b.uio_minor, b.cfg.dev) for b in found] == [(0, "a")]


def test_naa_wwn():
    assert configfs.naa_wwn("dev_42") == "naa.1990000000000042"
    assert len(configfs.naa_wwn("dev_12345678901234567")) == len("naa.199") + 13
