"""Clients of a running containerd (what upstream patches into `ctr`): `rpull` (lazy_pull.py) and
record-trace (trace_recorder.py), over containerd's gRPC services (services.py) and `ctr`.

Why not in `snapshotter/`: the snapshotter is a server containerd calls; these tools call containerd
(which then calls the snapshotter). They share the wire types (`containerd_api/`) and the label keys
(`oci/annotations.py`) with it, never its code.
"""
