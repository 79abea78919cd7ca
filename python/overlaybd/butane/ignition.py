"""Check a Butane (flatcar variant) document and translate it to Ignition JSON.

Covers the schema subset the overlaybd templates use (storage.files/directories/links,
systemd.units with dropins) with Butane's and Ignition's validation rules for those
fields, so a rendered config can be verified here and by `ignition-validate` without the
butane binary. Unknown keys are errors (like `butane --strict`).
"""

from __future__ import annotations

import base64
import posixpath
import urllib.parse
from typing import Any

IGNITION_VERSION = {"1.0.0": "3.3.0", "1.1.0": "3.4.0"}
UNIT_SUFFIXES = (
    ".service",
    ".socket",
    ".device",
    ".mount",
    ".automount",
    ".swap",
    ".target",
    ".path",
    ".timer",
    ".snapshot",
    ".slice",
    ".scope",
)


class ButaneError(ValueError):
    """The document breaks a Butane/Ignition rule; `field` is the dotted path of the offending key."""

    def __init__(self, source: str, field: str, message: str):
        super().__init__(f"{source}: {field}: {message}")
        self.source = source
        self.field = field


def _check_keys(src: str, field: str, obj: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ButaneError(src, field, f"expected a mapping, got {type(obj).__name__}")
    for key in obj:
        if key not in allowed:
            raise ButaneError(src, f"{field}.{key}" if field else str(key), "unused key (not in the schema)")
    return obj


def _path(src: str, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ButaneError(src, field, f"path {value!r} must be absolute")
    if posixpath.normpath(value) != value:
        raise ButaneError(src, field, f"path {value!r} is not clean")
    return value


def _mode(src: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ButaneError(src, field, f"mode {value!r} must be an integer (write it in octal, e.g. 0644)")
    if not 0 <= value <= 0o7777:
        raise ButaneError(src, field, f"mode {value:o} is out of range 0..07777")
    return value


def _data_url(text: str) -> str:
    """Shortest of the two plain RFC 2397 encodings (butane would also consider gzip)."""
    raw = text.encode()
    plain = "data:," + urllib.parse.quote(raw, safe="")
    b64 = "data:;base64," + base64.b64encode(raw).decode()
    return plain if len(plain) <= len(b64) else b64


def _owner(src: str, field: str, obj: Any) -> dict[str, Any]:
    _check_keys(src, field, obj, {"id", "name"})
    if ("id" in obj) == ("name" in obj):
        raise ButaneError(src, field, "exactly one of id and name is required")
    return dict(obj)


def _verification(src: str, field: str, v: Any) -> dict[str, str]:
    """contents.verification.hash: `sha256-HEX` or `sha512-HEX` (Ignition checks the fetched file against it)."""
    _check_keys(src, field, v, {"hash"})
    h = v.get("hash")
    algo, _, digest = h.partition("-") if isinstance(h, str) else ("", "", "")
    size = {"sha256": 64, "sha512": 128}.get(algo)
    if size is None or len(digest) != size or any(ch not in "0123456789abcdef" for ch in digest):
        raise ButaneError(src, f"{field}.hash", f"{h!r} is not sha256-<64 hex> or sha512-<128 hex>")
    return {"hash": h}


def _file(src: str, field: str, f: Any) -> dict[str, Any]:
    _check_keys(src, field, f, {"path", "overwrite", "contents", "append", "mode", "user", "group"})
    out: dict[str, Any] = {"path": _path(src, f"{field}.path", f.get("path"))}
    if "overwrite" in f:
        if not isinstance(f["overwrite"], bool):
            raise ButaneError(src, f"{field}.overwrite", "must be a boolean")
        out["overwrite"] = f["overwrite"]
    if "contents" in f:
        c = _check_keys(
            src, f"{field}.contents", f["contents"], {"source", "inline", "local", "compression", "verification"}
        )
        given = [k for k in ("source", "inline", "local") if k in c]
        if len(given) != 1:
            raise ButaneError(src, f"{field}.contents", "exactly one of source, inline, local is required")
        if "local" in c:
            raise ButaneError(src, f"{field}.contents.local", "local files are not supported here")
        if "inline" in c:
            if not isinstance(c["inline"], str):
                raise ButaneError(src, f"{field}.contents.inline", "must be a string")
            out["contents"] = {"compression": "", "source": _data_url(c["inline"])}
        else:
            out["contents"] = {"compression": c.get("compression", ""), "source": c["source"]}
        if "verification" in c:
            out["contents"]["verification"] = _verification(src, f"{field}.contents.verification", c["verification"])
    elif out.get("overwrite"):
        raise ButaneError(src, f"{field}.overwrite", "overwrite requires contents (Ignition ErrOverwriteAndNilSource)")
    if "mode" in f:
        out["mode"] = _mode(src, f"{field}.mode", f["mode"])
    for k in ("user", "group"):
        if k in f:
            out[k] = _owner(src, f"{field}.{k}", f[k])
    return out


def _unit_contents(src: str, field: str, text: Any) -> str:
    """Minimal unit-file syntax check: every non-comment line is a [Section] or Key=Value inside one."""
    if not isinstance(text, str):
        raise ButaneError(src, field, "must be a string")
    section = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        if s.startswith("[") and s.endswith("]"):
            section = s
        elif "=" not in s or section is None:
            raise ButaneError(src, f"{field} line {n}", f"not a unit-file assignment inside a section: {s!r}")
    return text


def _unit(src: str, field: str, u: Any) -> dict[str, Any]:
    _check_keys(src, field, u, {"name", "enabled", "mask", "contents", "dropins"})
    name = u.get("name")
    if not isinstance(name, str) or not name.endswith(UNIT_SUFFIXES):
        raise ButaneError(src, f"{field}.name", f"unit name {name!r} has no valid unit type suffix")
    out: dict[str, Any] = {"name": name}
    for k in ("enabled", "mask"):
        if k in u:
            if not isinstance(u[k], bool):
                raise ButaneError(src, f"{field}.{k}", "must be a boolean")
            out[k] = u[k]
    if "contents" in u:
        out["contents"] = _unit_contents(src, f"{field}.contents", u["contents"])
    if "dropins" in u:
        if not isinstance(u["dropins"], list):
            raise ButaneError(src, f"{field}.dropins", "must be a list")
        drops, names = [], set()
        for i, d in enumerate(u["dropins"]):
            df = f"{field}.dropins[{i}]"
            _check_keys(src, df, d, {"name", "contents"})
            dn = d.get("name")
            if not isinstance(dn, str) or not dn.endswith(".conf") or "/" in dn:
                raise ButaneError(src, f"{df}.name", f"drop-in name {dn!r} must end in .conf")
            if dn in names:
                raise ButaneError(src, f"{df}.name", f"duplicate drop-in {dn!r}")
            names.add(dn)
            drop = {"name": dn}
            if "contents" in d:
                drop["contents"] = _unit_contents(src, f"{df}.contents", d["contents"])
            drops.append(drop)
        out["dropins"] = drops
    return out


def translate(doc: Any, source: str = "<butane>") -> dict[str, Any]:
    """Butane document (parsed YAML) -> Ignition config dict; raises ButaneError naming the field."""
    _check_keys(source, "", doc, {"variant", "version", "storage", "systemd"})
    if doc.get("variant") != "flatcar":
        raise ButaneError(source, "variant", f"{doc.get('variant')!r} is not 'flatcar'")
    version = doc.get("version")
    if version not in IGNITION_VERSION:
        raise ButaneError(source, "version", f"{version!r} is not one of {', '.join(IGNITION_VERSION)}")
    ign: dict[str, Any] = {"ignition": {"version": IGNITION_VERSION[version]}}
    paths: set[str] = set()
    if "storage" in doc:
        st = _check_keys(source, "storage", doc["storage"], {"files", "directories", "links"})
        storage: dict[str, Any] = {}
        for kind in ("files", "directories", "links"):
            items = st.get(kind)
            if items is None:
                continue
            if not isinstance(items, list):
                raise ButaneError(source, f"storage.{kind}", "must be a list")
            out = []
            for i, item in enumerate(items):
                field = f"storage.{kind}[{i}]"
                if kind == "files":
                    entry = _file(source, field, item)
                elif kind == "directories":
                    _check_keys(source, field, item, {"path", "overwrite", "mode", "user", "group"})
                    entry = {"path": _path(source, f"{field}.path", item.get("path"))}
                    if "mode" in item:
                        entry["mode"] = _mode(source, f"{field}.mode", item["mode"])
                else:
                    _check_keys(source, field, item, {"path", "target", "hard", "overwrite", "user", "group"})
                    entry = {"path": _path(source, f"{field}.path", item.get("path"))}
                    if not isinstance(item.get("target"), str) or not item["target"]:
                        raise ButaneError(source, f"{field}.target", "is required")
                    entry["target"] = item["target"]
                    for flag in ("hard", "overwrite"):
                        if flag in item:
                            if not isinstance(item[flag], bool):
                                raise ButaneError(source, f"{field}.{flag}", "must be a boolean")
                            entry[flag] = item[flag]
                if entry["path"] in paths:
                    raise ButaneError(source, f"{field}.path", f"duplicate path {entry['path']!r}")
                paths.add(entry["path"])
                out.append(entry)
            storage[kind] = out
        ign["storage"] = storage
    if "systemd" in doc:
        sd = _check_keys(source, "systemd", doc["systemd"], {"units"})
        units, names = [], set()
        for i, u in enumerate(sd.get("units") or []):
            unit = _unit(source, f"systemd.units[{i}]", u)
            if unit["name"] in names:
                raise ButaneError(source, f"systemd.units[{i}].name", f"duplicate unit {unit['name']!r}")
            names.add(unit["name"])
            units.append(unit)
        ign["systemd"] = {"units": units}
    return ign


def load_yaml(text: str, source: str = "<butane>") -> Any:
    """Parse Butane YAML (PyYAML, YAML 1.1: 0644 is octal like in Butane)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ButaneError(source, "yaml", str(e).replace("\n", " ")) from None
