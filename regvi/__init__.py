"""regvi — regularised Bayesian scVI for large single-cell atlases."""

from __future__ import annotations

__version__ = "0.1.0"

from regvi import datasets
from regvi.io import load
from regvi.map.labels import transfer_labels as transfer_labels
from regvi.model import RegVI
from regvi.multimodal import RegMultiVI
from regvi.simulate import simulate, simulate_multiome, simulate_to_mmap

__all__ = [
    "RegMultiVI",
    "RegVI",
    "__version__",
    "datasets",
    "load",
    "simulate",
    "simulate_multiome",
    "simulate_to_mmap",
]
