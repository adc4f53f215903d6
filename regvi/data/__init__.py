"""Data path: AnnData → covariate registry → minibatches."""

from regvi.data.counts import get_counts, validate_counts
from regvi.data.loader import (
    BatchIndexSampler,
    CountBatches,
    MultiCountBatches,
    make_loader,
    train_validation_split,
)
from regvi.data.registry import CovariateRegistry

__all__ = [
    "BatchIndexSampler",
    "CountBatches",
    "CovariateRegistry",
    "MultiCountBatches",
    "get_counts",
    "make_loader",
    "train_validation_split",
    "validate_counts",
]
