"""Jacobian modality attribution: which latent block drives each decoder, per cell
(docs/model.md#jacobian-modality-attribution).

For a cell with posterior mean z = [z_m1 ; z_m2 ; ...] (joint latent, blocks in modality order)
and decoder d with features g, the attributed output f_d is, with ``target``:

* ``"mu"`` (default; docs/model.md#expected-count): the NB mean
  mu_{d,g}(z) = exp(l_d) · (rho_{d,g}(z) + s_{d,g}) · y_{d,g}, with l_d the posterior mean of
  d's library encoder and s_d (ambient), y_d (feature scaling) of the cell's categories. As s
  and y do not depend on z, ∂mu_{d,g}/∂z_j = exp(l_d) · y_{d,g} · ∂rho_{d,g}/∂z_j;
* ``"rho"``: the decoder output rate rho_{d,g}(z) alone (library-, ambient- and scaling-free).

With the Jacobian J_d = ∂f_d/∂z ``(G_d, D)`` and J_{d,m} its columns of latent block m:

* Frobenius scores: ``jacobian_<d>_<m>`` = ||J_{d,m}||_F and
  ``jacobian_<m>`` = sqrt(sum_d ||J_{d,m}||_F²), i.e. block m over every decoder's features;
  ``log2_ratio`` = log2(||J_{m0}||_F / ||J_{m1}||_F) for two blocks (alphabetical order);
* per latent dimension (upstream regularizedvi's ``attribution``):
  A_{d,j} = (1/G_d) sum_g |∂f_{d,g}/∂z_j| (``per_dim[d][:, j]``);
* L1 block scores: ``attr_<d>_<m>`` = sum_{j ∈ m} A_{d,j}; ``attr_<m>`` = sum_d attr_<d>_<m>;
* per-decoder totals, as upstream regularizedvi's ``store_attribution_results``:
  ``<d>_decoder_total_attr`` = sum_j A_{d,j} (over ALL latent dimensions of the joint z; not
  squared, not summed over decoders), ``<d>_decoder_own_attr`` = sum_{j ∈ d's block} A_{d,j},
  and for exactly two modalities m0 < m1 (alphabetical)
  ``log2_<m0>_vs_<m1>_attr`` = log2(total_{m0} / (total_{m1} + 1e-10)): the m0 decoder's total
  sensitivity to z against the m1 decoder's.

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

#: What the Jacobian differentiates: the NB mean mu (default) or the decoder rate rho.
TARGETS = ("mu", "rho")
#: Denominator offset of upstream regularizedvi's ``log2_<m0>_vs_<m1>_attr``.
UPSTREAM_LOG2_EPS = 1e-10


def check_target(target: str) -> str:
    """Validate an attribution ``target`` (``"mu"`` or ``"rho"``)."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {TARGETS}")
    return target


def upstream_log2_name(modalities: Sequence[str], suffix: str = "") -> str:
    """Upstream's per-cell log2 column name, ``log2_<m0>_vs_<m1>_attr<suffix>``."""
    m0, m1 = modalities
    return f"log2_{m0}_vs_{m1}_attr{suffix}"


@dataclass
class ModalityAttribution:
    """Per-cell and per-dimension Jacobian attribution.

    Attributes
    ----------
    per_cell
        One row per cell (see the module docstring for the equations): ``jacobian_<m>``
        (||J_m||_F) for every latent block m, ``jacobian_<d>_<m>`` (||J_{d,m}||_F),
        ``attr_<d>_<m>`` and ``attr_<m>`` (L1 block sums of the per-dimension mean absolute
        derivatives), ``<d>_decoder_total_attr`` and ``<d>_decoder_own_attr`` (upstream's
        per-decoder totals) and, with two modalities, ``log2_ratio`` (Frobenius, by latent block)
        and ``log2_<m0>_vs_<m1>_attr`` (upstream's, by decoder).
    per_dim
        Decoder d → ``(n_cells, D)`` mean ``|∂f_d / ∂z_j|`` over d's features.
    modalities
        Latent blocks / decoders, in latent order.
    target
        ``"mu"`` (the NB mean) or ``"rho"`` (the decoder rate): what was differentiated.
    """

    per_cell: pd.DataFrame
    per_dim: dict[str, np.ndarray]
    modalities: list[str]
    target: str = "mu"

    @classmethod
    def concatenate(
        cls,
        parts: Sequence[dict[str, Any]],
        modalities: Sequence[str],
        index: pd.Index | None = None,
    ) -> ModalityAttribution:
        """Join per-batch results of :func:`modality_attribution`."""
        mods = list(modalities)
        targets = {p["target"] for p in parts}
        if len(targets) != 1:
            raise ValueError(f"parts computed with no or different targets: {sorted(targets)}")
        target = targets.pop()
        sq = np.concatenate([p["block_sq"] for p in parts])  # (n, n_decoders, n_blocks)
        l1 = np.concatenate([p["block_l1"] for p in parts])  # (n, n_decoders, n_blocks)
        per_dim = {d: np.concatenate([p["per_dim"][d] for p in parts]) for d in mods}
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
        for d, dec in enumerate(mods):
            for b, m in enumerate(mods):
                cols[f"attr_{dec}_{m}"] = l1[:, d, b]
        for b, m in enumerate(mods):
            cols[f"attr_{m}"] = l1[:, :, b].sum(1)
        for d, dec in enumerate(mods):
            cols[f"{dec}_decoder_total_attr"] = l1[:, d, :].sum(1)
            cols[f"{dec}_decoder_own_attr"] = l1[:, d, d]
        if len(mods) == 2:
            t0, t1 = cols[f"{mods[0]}_decoder_total_attr"], cols[f"{mods[1]}_decoder_total_attr"]
            with np.errstate(divide="ignore"):
                cols[upstream_log2_name(mods)] = np.log2(t0 / (t1 + UPSTREAM_LOG2_EPS))
        per_cell = pd.DataFrame(cols, index=index)
        return cls(per_cell=per_cell, per_dim=per_dim, modalities=mods, target=target)

    def upstream_obs(self, suffix: str = "") -> pd.DataFrame:
        """Per-cell columns named and defined as upstream regularizedvi's ``adata.obs`` entries.

        ``<d>_decoder_total_attr<suffix>`` = ``sum_j mean_g |∂mu_{d,g}/∂z_j|`` (all latent
        dimensions), ``<d>_decoder_own_attr<suffix>`` (d's own block only) and, for two
        modalities, ``log2_<m0>_vs_<m1>_attr<suffix>`` = log2(total_{m0} / (total_{m1} + 1e-10))
        (``RegularizedMultimodalVI.store_attribution_results``). Upstream differentiates the NB
        mean (``px_rate`` × feature scaling), i.e. ``target="mu"``.
        """
        names = [f"{d}_decoder_{k}_attr" for d in self.modalities for k in ("total", "own")]
        if len(self.modalities) == 2:
            names.append(upstream_log2_name(self.modalities))
        out = self.per_cell[names].copy()
        out.columns = [f"{n}{suffix}" for n in names]
        return out

    def summary(self) -> dict[str, float]:
        """Scalar summaries for tracking (all floats).

        ``attribution_median_<m>`` (median ||J_m||_F), ``attribution_share_led_<m>`` (share of
        cells whose largest ||J_m||_F is block m), ``attribution_log2_ratio_median`` / ``_iqr``
        (Frobenius ratio, two blocks), ``attribution_<d>_decoder_total_attr_median``,
        ``attribution_log2_<m0>_vs_<m1>_attr_median`` / ``_mean`` / ``_iqr`` (upstream's ratio
        over the cells where it is finite) and ``attribution_target_mu`` (1.0 when the NB mean
        mu was differentiated, 0.0 for the decoder rate rho).
        """
        out: dict[str, float] = {"attribution_target_mu": float(self.target == "mu")}
        blocks = np.stack([self.per_cell[f"jacobian_{m}"] for m in self.modalities], axis=1)
        lead = blocks.argmax(1)
        for i, m in enumerate(self.modalities):
            out[f"attribution_median_{m}"] = float(np.median(blocks[:, i]))
            out[f"attribution_share_led_{m}"] = float(np.mean(lead == i))
        for d in self.modalities:
            total = self.per_cell[f"{d}_decoder_total_attr"].to_numpy()
            out[f"attribution_{d}_decoder_total_attr_median"] = float(np.median(total))
        if "log2_ratio" in self.per_cell:
            r = self.per_cell["log2_ratio"].to_numpy()
            out["attribution_log2_ratio_median"] = float(np.median(r))
            out["attribution_log2_ratio_iqr"] = float(np.subtract(*np.percentile(r, [75, 25])))
        if len(self.modalities) == 2:
            name = upstream_log2_name(self.modalities)
            r = self.per_cell[name].to_numpy()
            r = r[np.isfinite(r)]
            if r.size:
                out[f"attribution_{name}_median"] = float(np.median(r))
                out[f"attribution_{name}_mean"] = float(np.mean(r))
                out[f"attribution_{name}_iqr"] = float(np.subtract(*np.percentile(r, [75, 25])))
        return out


def _decoder_outputs(
    module: Any, batch: dict[str, Any], target: str, library: dict[str, torch.Tensor] | None
):
    """z → decoder outputs (mu or rho) of every modality, as a dict."""
    if target == "rho":
        return lambda z_: module.decoder_rates(z_, batch)
    return lambda z_: module.decoder_means(z_, batch, library)


def modality_attribution(
    module: Any,
    z: torch.Tensor,
    batch: dict[str, Any],
    target: str = "mu",
    library: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Attribution of one minibatch at latent ``z`` (``(B, D)``, usually the posterior mean).

    Parameters
    ----------
    module
        A :class:`regvi.multimodule.RegMultiVIModule` (in eval mode).
    z
        Latent at which to evaluate the Jacobian.
    batch
        The minibatch (covariates enter the decoders; ambient and scaling codes enter mu).
    target
        ``"mu"``: differentiate the NB mean mu_d = exp(l_d) · (rho_d + s_d) · y_d;
        ``"rho"``: the decoder rate rho_d.
    library
        Modality → log library ``(B, 1)`` for ``target="mu"`` (default: the posterior mean of
        each modality's library encoder on ``batch``).

    Returns
    -------
    dict
        ``block_sq`` ``(B, n_decoders, n_blocks)`` squared Frobenius norms, ``block_l1``
        ``(B, n_decoders, n_blocks)`` sums over the block's dimensions of the mean absolute
        derivatives, ``per_dim`` decoder → ``(B, D)`` mean absolute derivatives and ``target``.
    """
    check_target(target)
    if module.config.latent_mode != "concat":
        raise ValueError(
            f"modality attribution needs per-modality latent blocks (latent_mode='concat'); "
            f"got latent_mode={module.config.latent_mode!r}"
        )
    mods = list(module.modalities)
    slices = module.slices
    n_cells, n_dims = z.shape
    block_of = np.empty(n_dims, dtype=np.int64)
    for b, m in enumerate(mods):
        block_of[slices[m]] = b
    if target == "mu" and library is None:
        library = module.posterior_library(batch)
    if library is not None:
        library = {m: v.detach() for m, v in library.items()}
    z = z.detach()
    block_sq = torch.zeros(n_cells, len(mods), len(mods), dtype=torch.float64)
    block_l1 = torch.zeros(n_cells, len(mods), len(mods), dtype=torch.float64)
    per_dim = {m: torch.zeros(n_cells, n_dims, dtype=torch.float64) for m in mods}
    decode = _decoder_outputs(module, batch, target, library)

    def outputs(z_: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = decode(z_)
        return tuple(out[m] for m in mods)

    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*get_attr Node with no underlying reference.*")
        z = z.clone()
        # linearize: the primal pass is computed once and reused by every column's JVP
        _, jvp_fn = torch.func.linearize(outputs, z)
        for j in range(n_dims):
            tangent = torch.zeros_like(z)
            tangent[:, j] = 1.0
            cols = jvp_fn(tangent)
            b = int(block_of[j])
            for d, m in enumerate(mods):
                col = cols[d].detach()
                mean_abs = col.abs().mean(-1).double()
                block_sq[:, d, b] += (col * col).sum(-1).double()
                block_l1[:, d, b] += mean_abs
                per_dim[m][:, j] = mean_abs
    return {
        "block_sq": block_sq.numpy(),
        "block_l1": block_l1.numpy(),
        "per_dim": {m: v.numpy() for m, v in per_dim.items()},
        "target": target,
    }


def full_jacobian(
    module: Any,
    z: torch.Tensor,
    batch: dict[str, Any],
    cell: int,
    target: str = "mu",
    library: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference: the full Jacobian ``(sum_d G_d, D)`` of all decoders for one cell (tests).

    ``target`` and ``library`` as in :func:`modality_attribution`.
    """
    check_target(target)
    mods = list(module.modalities)
    if target == "mu" and library is None:
        library = module.posterior_library(batch)
    sub = _select_cell(batch, cell)
    lib = None if library is None else {m: v[cell : cell + 1].detach() for m, v in library.items()}
    decode = _decoder_outputs(module, sub, target, lib)

    def f(z_row: torch.Tensor) -> torch.Tensor:
        out = decode(z_row[None, :])
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


__all__ = [
    "TARGETS",
    "ModalityAttribution",
    "check_target",
    "full_jacobian",
    "modality_attribution",
    "upstream_log2_name",
]
