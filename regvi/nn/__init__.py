"""Neural-network building blocks and distributions shared by every regvi model."""

from regvi.nn.distributions import (
    gamma_log_prob,
    gamma_poisson_log_prob,
    gamma_poisson_log_prob_rows,
    gamma_poisson_log_prob_unnormalised,
    normal_kl,
)
from regvi.nn.layers import (
    ACTIVATIONS,
    CategoricalInjector,
    Decoder,
    Encoder,
    FCBlock,
    LibraryEncoder,
)

__all__ = [
    "ACTIVATIONS",
    "CategoricalInjector",
    "Decoder",
    "Encoder",
    "FCBlock",
    "LibraryEncoder",
    "gamma_log_prob",
    "gamma_poisson_log_prob",
    "gamma_poisson_log_prob_rows",
    "gamma_poisson_log_prob_unnormalised",
    "normal_kl",
]
