"""containerd's gRPC wire types (`*.proto` here, stubs generated at build time by `python/gen_protos.py`).

Why a package of its own: the snapshotter serves `Snapshots` and `containerd_client` calls containerd's
content, images, leases and snapshots services; both speak the same messages, and neither should
import the other to get them. The `.proto` files must stay in one directory: they import each other
by file name and register in one descriptor pool.
"""
