"""On-disk bytes of overlaybd images: LSMT layers, ZFile, tar wrapper, trace files.

Knows nothing of where files come from (local disk or registry) nor of daemons.
"""
