"""flatcar-overlaybd: overlaybd's lazy-loading block images, in Python, for Flatcar."""

__version__ = "0.1.0"
