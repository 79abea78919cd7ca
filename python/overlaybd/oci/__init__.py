"""OCI images on disk and in transit: layouts, manifests, indexes, media types, skopeo transport, and the
annotations and labels that make an image an overlaybd image (incl. its acceleration layer).

Why one package: the convertor writes overlaybd images, record-trace rewrites them and rpull and the
snapshotter read their annotations; each of them used to carry its own copy of this. Nothing here
speaks gRPC or knows containerd's API.
"""
