"""Jacobian modality attribution (spec §6): which latent block drives each decoder, per cell.

For a cell with posterior mean z = [z_m1 ; z_m2 ; ...] and decoder output rates
rho_d(z) (decoder d, features g), the Jacobian block J_{d,m} = ∂rho_d / ∂z_m. The scores are

* ``||J_m||_F`` = sqrt(sum_d ||J_{d,m}||_F²): how strongly modality m's latent block moves all
  decoded features of the cell;
* ``||J_{d,m}||_F`` per decoder × block;
* per latent dimension j and decoder d: mean_g |∂rho_{d,g} / ∂z_j|.

They are computed with one forward-mode JVP per latent column j: the tangent is the one-hot
e_j for every cell of the batch, and since cells are independent the batched JVP gives each
cell's own column. ``torch.func.linearize`` shares the primal pass between columns. Memory is
O(batch × features), independent of the latent size.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch


@dataclass
class ModalityAttribution:
    """Per-cell and per-dimension Jacobian attribution.

    Attributes
    ----------
    per_cell
        One row per cell: ``jacobian_<m>`` (||J_m||_F) for every latent block m,
        ``jacobian_<d>_<m>`` (||J_{d,m}||_F) and, with two modalities, ``log2_ratio`` =
        log2(||J_first|| / ||J_second||) in alphabetical order of the blocks.
    per_dim
        Decoder d → ``(n_cells, D)`` mean |∂rho_d / ∂z_j| over d's features.
    modalities
        Latent blocks / decoders, in latent order.
    """

    per_cell: pd.DataFrame
    per_dim: dict[str, np.ndarray]
    modalities: list[str]

    @classmethod
    def concatenate(
        cls,
        parts: Sequence[dict[str, Any]],
        modalities: Sequence[str],
        index: pd.Index | None = None,
    ) -> ModalityAttribution:
        """Join per-batch results of :func:`modality_attribution`."""
        mods = list(modalities)
        sq = np.concatenate([p["block_sq"] for p in parts])  # (n, n_decoders, n_blocks)
        cols: dict[str, np.ndarray] = {}
        for b, m in enumerate(mods):
            cols[f"jacobian_{m}"] = np.sqrt(sq[:, :, b].sum(1))
        for d, dec in enumerate(mods):
            for b, m in enumerate(mods):
                cols[f"jacobian_{dec}_{m}"] = np.sqrt(sq[:, d, b])
        if len(mods) == 2:
            a, b = cols[f"jacobian_{mods[0]}"], cols[f"jacobian_{mods[1]}"]
            tiny = np.finfo(np.float64).tiny
            cols["log2_ratio"] = np.log2(np.maximum(a, tiny) / np.maximum(b, tiny))
        per_cell = pd.DataFrame(cols, index=index)
        per_dim = {d: np.concatenate([p["per_dim"][d] for p in parts]) for d in mods}
        return cls(per_cell=per_cell, per_dim=per_dim, modalities=mods)

    def summary(self) -> dict[str, float]:
        """Scalar summaries for tracking: median ||J_m||, share of cells led by each block."""
        out: dict[str, float] = {}
        blocks = np.stack([self.per_cell[f"jacobian_{m}"] for m in self.modalities], axis=1)
        lead = blocks.argmax(1)
        for i, m in enumerate(self.modalities):
            out[f"attribution_median_{m}"] = float(np.median(blocks[:, i]))
            out[f"attribution_share_led_{m}"] = float(np.mean(lead == i))
        if "log2_ratio" in self.per_cell:
            r = self.per_cell["log2_ratio"].to_numpy()
            out["attribution_log2_ratio_median"] = float(np.median(r))
            out["attribution_log2_ratio_iqr"] = float(np.subtract(*np.percentile(r, [75, 25])))
        return out


def modality_attribution(module: Any, z: torch.Tensor, batch: dict[str, Any]) -> dict[str, Any]:
    """Attribution of one minibatch at latent ``z`` (``(B, D)``, usually the posterior mean).

    Parameters
    ----------
    module
        A :class:`regvi.multimodule.RegMultiVIModule` (in eval mode).
    z
        Latent at which to evaluate the Jacobian.
    batch
        The minibatch (covariates enter the decoders).

    Returns
    -------
    dict
        ``block_sq`` ``(B, n_decoders, n_blocks)`` squared Frobenius norms and ``per_dim``
        decoder → ``(B, D)`` mean absolute derivatives.
    """
    mods = list(module.modalities)
    slices = module.slices
    n_cells, n_dims = z.shape
    block_of = np.empty(n_dims, dtype=np.int64)
    for b, m in enumerate(mods):
        block_of[slices[m]] = b
    z = z.detach()
    block_sq = torch.zeros(n_cells, len(mods), len(mods), dtype=torch.float64)
    per_dim = {m: torch.zeros(n_cells, n_dims, dtype=torch.float64) for m in mods}

    def rates(z_: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = module.decoder_rates(z_, batch)
        return tuple(out[m] for m in mods)

    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*get_attr Node with no underlying reference.*")
        z = z.clone()
        # linearize: the primal pass is computed once and reused by every column's JVP
        _, jvp_fn = torch.func.linearize(rates, z)
        for j in range(n_dims):
            tangent = torch.zeros_like(z)
            tangent[:, j] = 1.0
            cols = jvp_fn(tangent)
            b = int(block_of[j])
            for d, m in enumerate(mods):
                col = cols[d].detach()
                block_sq[:, d, b] += (col * col).sum(-1).double()
                per_dim[m][:, j] = col.abs().mean(-1).double()
    return {
        "block_sq": block_sq.numpy(),
        "per_dim": {m: v.numpy() for m, v in per_dim.items()},
    }


def full_jacobian(module: Any, z: torch.Tensor, batch: dict[str, Any], cell: int) -> torch.Tensor:
    """Reference: the full Jacobian ``(sum_d G_d, D)`` of all decoders for one cell (tests)."""
    mods = list(module.modalities)

    def f(z_row: torch.Tensor) -> torch.Tensor:
        sub = _select_cell(batch, cell)
        out = module.decoder_rates(z_row[None, :], sub)
        return torch.cat([out[m][0] for m in mods])

    with torch.inference_mode(False), torch.enable_grad():
        return torch.autograd.functional.jacobian(f, z[cell].detach().clone())


def _select_cell(batch: dict[str, Any], cell: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k in ("x_nonzero", "x_values"):
            continue  # flat entries of the whole batch; not per-cell rows
        if isinstance(v, dict):
            out[k] = _select_cell(v, cell)
        elif torch.is_tensor(v) and v.dim() > 0:
            out[k] = v[cell : cell + 1]
        else:
            out[k] = v
    return out


__all__ = ["ModalityAttribution", "full_jacobian", "modality_attribution"]
