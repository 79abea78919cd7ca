"""Console tools. Each tool is a thin argument parser; all logic lives in the packages below.

`TOOLS` is the single table of tool names -> entry points. It drives the
console scripts in pyproject.toml (kept in sync by a test), the multi-call
binary used by the frozen sysext bundle, and the symlinks in its `bin/`.
"""

TOOLS: dict[str, str] = {
    "overlaybd-create": "overlaybd.cli.create:main",
    "overlaybd-commit": "overlaybd.cli.commit:main",
    "overlaybd-zfile": "overlaybd.cli.zfile:main",
    "overlaybd-merge": "overlaybd.cli.merge:main",
    "overlaybd-dump": "overlaybd.cli.dump:main",
    "overlaybd-info": "overlaybd.cli.info:main",
    "overlaybd-cache": "overlaybd.cli.cache:main",
    "overlaybd-tcmu": "overlaybd.cli.tcmu:main",
    "overlaybd-snapshotter": "overlaybd.cli.snapshotter:main",
    "rpull": "overlaybd.cli.rpull:main",
    "overlaybd-convert": "overlaybd.cli.convert:main",
    "overlaybd-butane": "overlaybd.cli.butane:main",
    "overlaybd-record-trace": "overlaybd.cli.record_trace:main",
    "overlaybd-download-sysext": "overlaybd.cli.download_sysext:main",
}
