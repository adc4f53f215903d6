"""Log-densities used by the regvi loss, written out so each equation is visible.

All functions are element-wise and broadcast; reductions over plates happen in the
module's ``loss`` (see ``regvi.module``), following the plate rule
(docs/model.md#loss-and-the-plate-rule).
"""

from __future__ import annotations

import math

import torch


def gamma_poisson_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of counts under GammaPoisson(concentration=theta, rate=theta/mu).

    This is the negative binomial with mean ``mu`` and ``Var = mu + mu**2 / theta``
    (docs/model.md#likelihood).

    Parameters
    ----------
    x
        Observed counts, shape ``(n_cells, n_genes)``.
    mu
        Expected counts, same shape as ``x``.
    theta
        Inverse dispersion, broadcastable to ``x``.

    Returns
    -------
    torch.Tensor
        Element-wise log-probability, same shape as ``x``.
    """
    eps = 1e-8
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1.0)
    )


def gamma_poisson_log_prob_unnormalised(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    log_theta: torch.Tensor,
    lgamma_theta: torch.Tensor,
) -> torch.Tensor:
    """GammaPoisson log-probability without the data constant ``−lgamma(x + 1)``.

    Same equation as :func:`gamma_poisson_log_prob`, but ``log theta`` and ``lgamma(theta)`` are
    passed in, so callers can compute them once per (group, gene) instead of per cell; the
    constant ``lgamma(x + 1)`` is summed separately over non-zero counts only.
    """
    eps = 1e-8
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (log_theta - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - lgamma_theta
    )


def gamma_poisson_log_prob_rows(
    x: torch.Tensor,
    mu: torch.Tensor,
    log_theta: torch.Tensor,
    codes: torch.Tensor | None = None,
    nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-cell sum over features of :func:`gamma_poisson_log_prob_unnormalised`, ``(B,)``.

    Same equation, split by where it is non-zero, with theta given per (group, gene): cell n
    uses row ``codes[n]`` of ``log_theta`` (``(n_groups, G)``; ``codes=None`` with one group).

    * For x = 0 the log-probability is theta · (log theta − log(theta + mu)). Summed over genes,
      sum_g theta_dg log theta_dg is a per-group constant, so only theta · log(theta + mu) is
      computed per cell.
    * The terms x · (log mu − log(theta + mu)) and lgamma(x + theta) − lgamma(theta) vanish at
      x = 0, so they are computed only at the non-zero counts (a few percent of entries in
      single-cell data, < 1 % for ATAC), with lgamma(theta) read from its (group, gene) table.
      This skips most lgamma / digamma evaluations, which dominate the dense likelihood's cost.

    ``nonzero`` = (flat row-major positions, values) of the stored entries of ``x``, as the
    minibatch loaders provide them from the CSR slice; without it they are found with
    ``torch.nonzero``. Explicitly stored zeros contribute exactly 0.
    """
    eps = 1e-8
    n_features = x.shape[-1]
    theta_groups = torch.exp(log_theta)
    lgamma_theta = torch.lgamma(theta_groups)
    group_const = (theta_groups * log_theta).sum(-1)  # (n_groups,)
    if codes is None:
        theta = theta_groups  # (1, G), broadcast over cells
        const = group_const
    else:
        # index_select: its backward is a row-wise index_add, not advanced indexing's much
        # slower accumulating index_put (the largest single op in a CPU profile before this)
        theta = theta_groups.index_select(0, codes)
        const = group_const.index_select(0, codes)
    log_theta_mu = torch.log(theta + mu + eps)
    dense = const - (theta * log_theta_mu).sum(-1)
    if nonzero is None:
        flat = torch.nonzero(x.reshape(-1)).squeeze(1)
        xv = x.reshape(-1).index_select(0, flat)
    else:
        flat, xv = nonzero
    rows = torch.div(flat, n_features, rounding_mode="floor")
    cols = flat - rows * n_features
    # (group, gene) entries at the non-zeros: flat index group · G + gene
    group_flat = cols if codes is None else codes.index_select(0, rows) * n_features + cols
    theta_v = theta_groups.reshape(-1).index_select(0, group_flat)
    lgamma_v = lgamma_theta.reshape(-1).index_select(0, group_flat)
    mu_v = mu.reshape(-1).index_select(0, flat)
    log_theta_mu_v = log_theta_mu.reshape(-1).index_select(0, flat)
    sparse = xv * (torch.log(mu_v + eps) - log_theta_mu_v) + torch.lgamma(xv + theta_v) - lgamma_v
    return dense.index_add(0, rows, sparse)


def normal_kl(
    q_mean: torch.Tensor, q_var: torch.Tensor, p_mean: torch.Tensor, p_var: torch.Tensor
) -> torch.Tensor:
    """Element-wise KL(N(q_mean, q_var) || N(p_mean, p_var)) (variances, not scales)."""
    return 0.5 * (torch.log(p_var / q_var) + (q_var + (q_mean - p_mean) ** 2) / p_var - 1.0)


def gamma_log_prob(
    value: torch.Tensor, concentration: float, rate: float | torch.Tensor
) -> torch.Tensor:
    """Element-wise log density of Gamma(concentration, rate) (rate, not scale)."""
    rate = torch.as_tensor(rate, dtype=value.dtype, device=value.device)
    return (
        concentration * torch.log(rate)
        + (concentration - 1.0) * torch.log(value)
        - rate * value
        - math.lgamma(concentration)
    )


def exponential_log_prob(value: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Element-wise log density of Exponential(rate)."""
    return torch.log(rate) - rate * value


def normal_entropy(scale: torch.Tensor) -> torch.Tensor:
    """Element-wise entropy of a Normal with standard deviation ``scale``."""
    return 0.5 + 0.5 * math.log(2 * math.pi) + torch.log(scale)
