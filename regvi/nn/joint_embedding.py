"""Joint-embedding loss for low-count cells: binomial thinning + Barlow Twins.

An amortised encoder maps a cell with few counts towards a learned bias point, so low-UMI cells
drift together in the latent space. The joint-embedding loss trains the encoder to give a cell
and a binomially thinned copy of it the same embedding (Zbontar et al. 2021, Barlow Twins):

* thinning        x*_ng ~ Binomial(x_ng, f_n),  f_n ~ Uniform(f_min, f_max) per cell
* embeddings      z_n = E_q[z | x_n],  z*_n = E_q[z | x*_n]  (posterior means)
* cross-corr.     C_ij = (1/B) Σ_n ẑ_ni ẑ*_nj,  ẑ standardised over the minibatch per dimension
* loss            L_JE = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²

``L_JE`` is a per-minibatch auxiliary term added (× its weight) to the training loss; it is not
part of the ELBO (validation and early stopping do not see it).
"""

from __future__ import annotations

import torch


def thin_counts(
    x: torch.Tensor,
    min_fraction: float,
    max_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binomially thin each cell's counts to a fraction drawn uniformly in ``[min, max]``.

    Parameters
    ----------
    x
        Counts ``(B, G)`` (rounded to integers before thinning).
    min_fraction, max_fraction
        Range of the per-cell fraction of counts kept.
    generator
        Optional torch generator (default: the global RNG).

    Returns
    -------
    tuple
        The thinned counts ``(B, G)`` and the per-cell fractions ``(B,)``.
    """
    f = torch.rand(x.shape[0], 1, device=x.device, dtype=x.dtype, generator=generator)
    f = min_fraction + (max_fraction - min_fraction) * f
    counts = torch.round(x).clamp_min(0.0)
    thinned = torch.binomial(counts, f.expand_as(counts), generator=generator)
    return thinned, f[:, 0]


def barlow_twins_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    off_diagonal: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Barlow Twins loss between two embeddings of the same cells (``(B, D)`` each).

    Each dimension is standardised over the minibatch; the cross-correlation matrix is pushed to
    the identity: invariance on the diagonal, redundancy reduction (× ``off_diagonal``) off it.
    ``weights`` ``(B,)`` (e.g. 1 for cells that have the modality, 0 otherwise) weight the
    cells in the means, standard deviations and correlations. Computed in float32 also under
    mixed precision (C_ii near 1 needs the resolution).
    """
    eps = 1e-5
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        w = torch.ones_like(z1[:, :1]) if weights is None else weights.float()[:, None]
        total = w.sum().clamp_min(1.0)

        def standardise(z: torch.Tensor) -> torch.Tensor:
            mean = (w * z).sum(0) / total
            std = ((w * (z - mean).pow(2)).sum(0) / total).sqrt()
            return (z - mean) / (std + eps)

        a, b = standardise(z1), standardise(z2)
        c = (w * a).T @ b / total
        diag = torch.diagonal(c)
        on = (1.0 - diag).pow(2).sum()
        off = c.pow(2).sum() - diag.pow(2).sum()
        return on + off_diagonal * off
