"""Console tools. Each tool is a thin argument parser; all logic lives in the packages below.

`TOOLS` is the single table of tool names -> entry points. It drives the
console scripts in pyproject.toml (kept in sync by a test), the multi-call
binary used by the frozen sysext bundle, and the symlinks in its `bin/`;
`SNAPSHOTTER_TOOLS` are the symlinks in its `snapshotter/` directory.
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
    "overlaybd-apply": "overlaybd.cli.apply:main",
    "turboOCI-apply": "overlaybd.cli.apply:turbo_main",
}

#: Tools of upstream's snapshotter directory (`/usr/local/overlaybd/snapshotter/<name>`, Flatcar's
#: `/opt/overlaybd/snapshotter/<name>`), by the names the documentation calls them. Kept out of `bin/` and
#: of the console scripts: a `ctr` there would shadow the system's containerd client.
SNAPSHOTTER_TOOLS: dict[str, str] = {
    "ctr": "overlaybd.cli.ctr:main",
    "convertor": "overlaybd.cli.convertor:main",
    "overlaybd-attacher": "overlaybd.cli.attacher:main",
}

#: every name the multi-call executable answers to
ALL_TOOLS: dict[str, str] = {**TOOLS, **SNAPSHOTTER_TOOLS}
