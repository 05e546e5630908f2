"""zsad: distributed batch pipeline for zero- and few-shot visual anomaly detection."""

__version__ = "0.1.0"
