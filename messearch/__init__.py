"""messearch: Multi-Exit Semantic Segmentation networks and an exact, exhaustive early-exit search."""

__version__ = "0.1.0"
