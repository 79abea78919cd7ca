"""Render the Butane template with typed, validated variables (one table drives parsing, help and docs)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUTANE_VERSIONS = ("1.0.0", "1.1.0")
RW_MODES = ("overlayfs", "dir", "dev")
DELIVERIES = ("flatcar", "sysupdate")
SYSUPDATE_ARCHES = ("x86-64", "arm64")
TEMPLATE = "overlaybd.bu.j2"
CONTAINERD_TEMPLATE = "containerd-config.toml.j2"
TRANSFER_TEMPLATE = "sysupdate-overlaybd.transfer.j2"
SYSUPDATE_UNIT_TEMPLATE = "overlaybd-sysupdate.service.j2"


class ButaneVarError(ValueError):
    """A --var value is invalid; the message names the variable."""

    def __init__(self, name: str, message: str):
        super().__init__(f"variable {name!r}: {message}")
        self.name = name


def _choice(options: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, value: str) -> str:
        if value not in options:
            raise ButaneVarError(name, f"{value!r} is not one of {', '.join(options)}")
        return value

    return parse


def _positive_int(name: str, value: str) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise ButaneVarError(name, f"{value!r} is not an integer") from None
    if not 1 <= n <= 1 << 20:
        raise ButaneVarError(name, f"{n} is out of range 1..{1 << 20}")
    return n


def _bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ButaneVarError(name, f"{value!r} is not a boolean (true/false)")


def _abs_path(name: str, value: str) -> str:
    if not value.startswith("/") or os.path.normpath(value) != value or any(c in value for c in '\n\0"\\'):
        raise ButaneVarError(name, f"{value!r} is not a clean absolute path")
    return value


def _registry_auth(name: str, value: str) -> tuple[str, str, str]:
    """HOST[/REPO]=USER:PASSWORD; the password may contain ':' and '='; the user may not contain ':'."""
    host, sep, cred = value.partition("=")
    user, sep2, password = cred.partition(":")
    if not sep or not sep2 or not host or not user:
        raise ButaneVarError(name, "expected HOST[/REPO]=USER:PASSWORD")
    if any(c.isspace() for c in host) or host.startswith(("http://", "https://")):
        raise ButaneVarError(name, f"registry {host!r} must be HOST[:PORT][/REPO] without scheme or spaces")
    return host, user, password


def _plain_http_host(name: str, value: str) -> str:
    """HOST[:PORT] of a registry reached over plain http (no scheme, no path)."""
    host = value.strip()
    if not host or any(c.isspace() for c in host) or "/" in host or host.startswith(("http:", "https:")):
        raise ButaneVarError(name, f"registry {value!r} must be HOST[:PORT] without scheme, path or spaces")
    return host


def _base_url(name: str, value: str) -> str:
    """http(s) URL of the directory holding SHA256SUMS and the images; normalised to end in '/'."""
    v = value.strip()
    scheme, sep, rest = v.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or rest.startswith("/"):
        raise ButaneVarError(name, f"{value!r} is not an http:// or https:// URL")
    if any(c.isspace() or c in '"\\%@' or ord(c) < 0x20 for c in v) or "?" in v or "#" in v:
        raise ButaneVarError(name, f"{value!r}: no spaces, quotes, backslashes, '%', '@', query or fragment")
    return v if v.endswith("/") else v + "/"


def _sysext_version(name: str, value: str) -> str:
    """A sysupdate version (the @v of overlaybd_@v_%a.raw): no '_' so the pattern stays unambiguous."""
    v = value.strip()
    ok = v and v[0].isascii() and v[0].isalnum() and all(c.isascii() and (c.isalnum() or c in ".+~-") for c in v)
    if not ok:
        raise ButaneVarError(name, f"{value!r} is not a version (letters, digits, '.', '+', '~', '-')")
    return v


def _sha256(name: str, value: str) -> str:
    v = value.strip().lower()
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise ButaneVarError(name, f"{value!r} is not a sha256 (64 hex digits)")
    return v


def _default_version() -> str:
    from overlaybd import __version__

    return __version__


@dataclass(frozen=True)
class Variable:
    """One template variable: how to parse it from --var, its default, and what it does."""

    parse: Callable[[str, str], Any]
    default: Any
    help: str
    repeat: bool = False
    secret: bool = False  # the value carries credentials: output that holds it must be private (0600)


VARIABLES: dict[str, Variable] = {
    "butane_version": Variable(
        _choice(BUTANE_VERSIONS), "1.1.0", "Butane flatcar variant version (1.0.0 -> Ignition 3.3.0, 1.1.0 -> 3.4.0)"
    ),
    "snapshotter_address": Variable(
        _abs_path, "/run/overlaybd-snapshotter/overlaybd.sock", "unix socket of overlaybd-snapshotter"
    ),
    "registry_auth": Variable(
        _registry_auth,
        (),
        "HOST[/REPO]=USER:PASSWORD, repeatable; writes /etc/overlaybd/cred.json (0600) for lazy loading",
        repeat=True,
        secret=True,
    ),
    "cache_size_gb": Variable(
        _positive_int, None, "registry cache size in GiB; writes /etc/overlaybd/overlaybd.json from the defaults"
    ),
    "rw_mode": Variable(
        _choice(RW_MODES), None, "snapshotter rwMode; writes /etc/overlaybd-snapshotter/config.json from the defaults"
    ),
    "plain_http_registry": Variable(
        _plain_http_host,
        (),
        "HOST[:PORT] of a plain-http registry, repeatable; writes /etc/overlaybd-snapshotter/config.json with an "
        "insecure mirrorRegistry entry so lazy reads use http:// (rpull needs --plain-http for it)",
        repeat=True,
    ),
    "cri_snapshotter": Variable(
        _bool, False, "make overlaybd the CRI snapshotter (kubelet) and forward snapshot annotations"
    ),
    "delivery": Variable(
        _choice(DELIVERIES),
        "flatcar",
        "flatcar: Flatcar's enabled-sysext.conf (image in lockstep with the OS); "
        "sysupdate: the SYSEXT_LEVEL image under /opt/extensions/overlaybd, updated by systemd-sysupdate",
    ),
    "sysupdate_url": Variable(
        _base_url, None, "delivery=sysupdate: base URL holding SHA256SUMS and overlaybd_<version>_<arch>.raw (required)"
    ),
    "sysupdate_version": Variable(
        _sysext_version, _default_version(), "delivery=sysupdate: the version Ignition installs at provisioning"
    ),
    "sysupdate_arch": Variable(
        _choice(SYSUPDATE_ARCHES), "x86-64", "delivery=sysupdate: architecture of the image Ignition installs"
    ),
    "sysupdate_sha256": Variable(
        _sha256, None, "delivery=sysupdate: sha256 of that image (Ignition verifies the download)"
    ),
}


def variable_name(text: str) -> str:
    """The one normalisation of a --var name (surrounding space, '-' for '_'), used for parsing and secrecy alike."""
    return text.strip().replace("-", "_")


def holds_secrets(values: dict[str, Any]) -> bool:
    """True when a secret variable (registry_auth) has a value other than its default."""
    return any(var.secret and values.get(name, var.default) != var.default for name, var in VARIABLES.items())


def parse_vars(pairs: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (from --var) -> typed values, defaults filled in."""
    values: dict[str, Any] = {name: var.default for name, var in VARIABLES.items()}
    seen: set[str] = set()
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = variable_name(name)
        if not sep:
            raise ButaneVarError(name, "expected KEY=VALUE")
        var = VARIABLES.get(name)
        if var is None:
            raise ButaneVarError(name, f"unknown variable (known: {', '.join(sorted(VARIABLES))})")
        value = var.parse(name, raw)
        if var.repeat:
            values[name] = (*values[name], value)
        elif name in seen:
            raise ButaneVarError(name, "given more than once")
        else:
            values[name] = value
        seen.add(name)
    return values


def _resource_dir(bundle_name: str, repo_dir: str, env: str) -> Path:
    """Templates/defaults: $env, else inside the frozen bundle, else the source checkout."""
    if os.environ.get(env):
        return Path(os.environ[env])
    meipass = getattr(sys, "_MEIPASS", None)
    if meipass and (Path(meipass) / bundle_name).is_dir():
        return Path(meipass) / bundle_name
    return Path(__file__).resolve().parents[3] / repo_dir


def template_dir() -> Path:
    return _resource_dir("overlaybd-butane", "butane", "OVERLAYBD_BUTANE_TEMPLATES")


def defaults_dir() -> Path:
    return _resource_dir("overlaybd-usr-etc", "usr-etc", "OVERLAYBD_USR_ETC")


def _to_json(value: Any) -> str:
    return json.dumps(value, indent=4, sort_keys=False) + "\n"


def _toml_str(value: str) -> str:
    # A JSON string (ASCII, \uXXXX escapes) is a valid TOML basic string.
    return json.dumps(str(value), ensure_ascii=True)


def _cred_json(auths: tuple[tuple[str, str, str], ...]) -> str | None:
    if not auths:
        return None
    doc: dict[str, Any] = {"auths": {}}
    for host, user, password in auths:
        if host in doc["auths"]:
            raise ButaneVarError("registry_auth", f"registry {host!r} given more than once")
        doc["auths"][host] = {"username": user, "password": password}
    return _to_json(doc)


def _load_default(rel: str) -> dict[str, Any]:
    path = defaults_dir() / rel
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ButaneVarError("defaults", f"{path}: {e}") from None


def _jinja_env():  # type: ignore[no-untyped-def]
    import jinja2  # imported here: keeps start-up of the other tools in the multi-call binary fast

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["toml_str"] = _toml_str
    return env


def sysupdate_transfer(url: str) -> str:
    """The systemd-sysupdate transfer file (component `overlaybd`) for images published at `url`: one
    source, the same text whether the build writes it or Butane installs it."""
    return _jinja_env().get_template(TRANSFER_TEMPLATE).render(sysupdate_url=_base_url("sysupdate_url", url))


def sysupdate_image_name(version: str, arch: str) -> str:
    """overlaybd_<version>_<arch>.raw: what build.sh --sysext-level writes and the transfer's pattern matches."""
    return f"overlaybd_{version}_{arch}.raw"


def render(values: dict[str, Any] | None = None) -> str:
    """Render the Butane YAML for `values` (output of parse_vars; missing keys take defaults)."""
    vals = {name: var.default for name, var in VARIABLES.items()}
    vals.update(values or {})
    env = _jinja_env()
    ctx = dict(vals)
    ctx["sysupdate"] = None
    if vals["delivery"] == "sysupdate":
        if not vals["sysupdate_url"]:
            raise ButaneVarError("sysupdate_url", "required with delivery=sysupdate (where the images are published)")
        image = sysupdate_image_name(vals["sysupdate_version"], vals["sysupdate_arch"])
        ctx["sysupdate"] = {
            "image": image,
            "source": vals["sysupdate_url"] + image,
            "sha256": vals["sysupdate_sha256"],
            "transfer": sysupdate_transfer(vals["sysupdate_url"]),
            "service": env.get_template(SYSUPDATE_UNIT_TEMPLATE).render(),
        }
    else:
        for name in ("sysupdate_url", "sysupdate_sha256"):
            if vals[name] is not None:
                raise ButaneVarError(name, "only used with delivery=sysupdate")
    ctx["containerd_config"] = env.get_template(CONTAINERD_TEMPLATE).render(**vals)
    ctx["cred_json"] = _cred_json(tuple(vals["registry_auth"]))
    ctx["overlaybd_json"] = None
    if vals["cache_size_gb"] is not None:
        doc = _load_default("overlaybd/overlaybd.json")
        doc.setdefault("cacheConfig", {})["cacheSizeGB"] = vals["cache_size_gb"]
        ctx["overlaybd_json"] = _to_json(doc)
    ctx["snapshotter_json"] = None
    plain = tuple(dict.fromkeys(vals["plain_http_registry"]))  # order kept, duplicates dropped
    if vals["rw_mode"] is not None or plain or vals["snapshotter_address"] != VARIABLES["snapshotter_address"].default:
        doc = _load_default("snapshotter/config.json")
        if vals["rw_mode"] is not None:
            doc["rwMode"] = vals["rw_mode"]
        doc["address"] = vals["snapshotter_address"]
        if plain:
            doc["mirrorRegistry"] = [*doc.get("mirrorRegistry", []), *({"host": h, "insecure": True} for h in plain)]
        ctx["snapshotter_json"] = _to_json(doc)
    return env.get_template(TEMPLATE).render(**ctx)
