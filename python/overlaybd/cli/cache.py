"""overlaybd-cache ls|prune|clear: inspect and trim the registry block cache (`cacheConfig.cacheDir`).

Upstream has no such tool; without it the only way to reclaim cache space is
deleting files under a running daemon. Removal here truncates before unlinking,
so space is freed even while a daemon still holds a blob open (it refetches).
Only the files the cache creates (`<digest>`, `<digest>.meta`) are touched: a cache
directory shared with anything else must not lose that other data.
"""

from __future__ import annotations

import json
import time

from .toolrun import ToolError, load_service, parser, run

TOOL = "overlaybd-cache"
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num) :]
    if not num.isdigit() or unit not in _UNITS:
        raise ToolError(f"--max-size: invalid size {text!r} (e.g. 500MiB, 2GiB, 1048576)")
    return int(num) * _UNITS[unit]


def main(argv: list[str] | None = None) -> int:
    p = parser(TOOL, "List, prune or clear the overlaybd registry block cache.")
    p.add_argument("--service_config_path", default=None, help="overlaybd.json (default /etc/overlaybd/overlaybd.json)")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: cacheConfig.cacheDir)")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("ls", help="list cached blobs, least recently used first")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    pr = sub.add_parser("prune", help="evict least recently used blobs down to a size")
    pr.add_argument("--max-size", default=None, help="target total (default: the cache's water mark)")
    sub.add_parser("clear", help="remove every cached blob")
    args = p.parse_args(argv)
    return run(TOOL, lambda: _run(args))


def _open_cache(args):
    from ..registry.cache import BlockCache, GiB

    svc = load_service(args.service_config_path)
    cc = svc.cache_config
    return BlockCache(args.cache_dir or cc.cache_dir, cc.cache_size_gb * GiB, cc.refill_size)


def _run(args) -> int:
    cache = _open_cache(args)
    if args.cmd == "ls":
        entries = sorted(cache.entries(), key=lambda e: e.last_used)
        if args.json:
            print(json.dumps([e.__dict__ for e in entries], indent=1))
            return 0
        print(f"{'DIGEST':<71} {'BLOB':>12} {'CACHED':>12} {'ON DISK':>12}  LAST USED")
        for e in entries:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
            print(f"{e.digest:<71} {e.blob_size:>12} {e.present_bytes:>12} {e.disk_bytes:>12}  {when}")
        total = sum(e.disk_bytes for e in entries)
        print(f"total {len(entries)} blobs, {total} bytes on disk, capacity {cache.capacity} bytes")
        return 0
    if args.cmd == "prune":
        target = parse_size(args.max_size) if args.max_size else None
        freed = cache.evict(target, reason="prune")
    else:
        freed = cache.clear()
    print(f"freed {freed} bytes")
    other = cache.foreign()
    if other:
        print(f"left {len(other)} files the cache did not create: {' '.join(other)}")
    return 0
