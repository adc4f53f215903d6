"""Growing a reference module for a query: genes, categories, parameters, freeze.

The query model has every category of the reference plus the query's unseen ones, appended at
the end of each key's category list, so every reference code keeps its index. Its module is
the reference's with the category-indexed parameters grown:

- rows of the technical terms (ambient beta, dispersion mu_theta / sigma_theta / lambda,
  feature scaling gamma, the library prior m_p / v_p);
- columns of the one-hot inputs of the decoder-conditioning and encoder-covariate layers.

New rows start the way training starts them (library prior and ambient from the query's
counts, depth-normalised with the reference's offset; dispersion and feature scaling at their
priors, or theta by method of moments when the reference used ``dispersion_init="data"``);
new one-hot columns start at the mean of the reference categories' columns (an "average
library" decoder). :class:`QueryFreeze` trains only the new rows by default, optionally the
new one-hot columns and the encoders; every other entry stays byte-identical.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from regvi.data import CovariateRegistry, get_counts
from regvi.data.counts import iter_row_blocks, row_totals
from regvi.data.registry import MODEL_PURPOSES
from regvi.initialisation import _depth_normalised_stats, _GroupMeans, _library_stats
from regvi.module import inverse_softplus

logger = logging.getLogger(__name__)

#: what a query may train besides the new technical rows
TRAINABLE = ("technical", "conditioning", "encoder")


# ---------------------------------------------------------------------------------- genes
def align_genes(
    adata: AnnData, var_names: Sequence[str], layer: str | None, allow_missing_genes: bool
) -> AnnData:
    """``adata`` with the reference's features in the reference's order.

    Query genes the reference lacks are dropped; reference genes the query lacks are an error,
    or (``allow_missing_genes``) zero columns with a warning. Returns ``adata`` itself when it
    already matches.
    """
    names = [str(v) for v in var_names]
    query = [str(v) for v in adata.var_names]
    if query == names:
        return adata
    if len(set(query)) != len(query):
        dup = pd.Index(query)[pd.Index(query).duplicated()].unique()[:5].tolist()
        raise ValueError(f"query var_names are not unique (e.g. {dup}); make them unique first")
    pos = {g: i for i, g in enumerate(query)}
    missing = [g for g in names if g not in pos]
    if missing and not allow_missing_genes:
        raise ValueError(
            f"the query lacks {len(missing)} of the reference's {len(names)} genes "
            f"(e.g. {missing[:5]}); subset or rename its var_names to the reference's, or pass "
            "allow_missing_genes=True to fill them with zero counts"
        )
    if len(missing) == len(names):
        raise ValueError(
            f"the query shares no gene with the reference (query e.g. {query[:5]}, reference "
            f"e.g. {names[:5]}); are var_names the same identifiers (symbols vs Ensembl IDs)?"
        )
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(names)} reference genes are missing in the query and are "
            f"filled with zero counts (e.g. {missing[:5]})",
            UserWarning,
            stacklevel=3,
        )
    X = get_counts(adata, layer)
    present = [g for g in names if g in pos]
    sub = X[:, [pos[g] for g in present]]
    if missing:
        target = np.array([i for i, g in enumerate(names) if g in pos])
        n = X.shape[0]
        sub = sp.csr_matrix(sub) if not sp.issparse(sub) else sub.tocsr()
        coo = sub.tocoo()
        sub = sp.csr_matrix(
            (coo.data, (coo.row, target[coo.col])), shape=(n, len(names)), dtype=sub.dtype
        )
    var = pd.DataFrame(index=pd.Index(names, name=adata.var_names.name))
    out = AnnData(obs=adata.obs.copy(), var=var)
    if layer is None:
        out.X = sub
    else:
        out.X = None
        out.layers[layer] = sub
    return out


# ---------------------------------------------------------------------------------- registry
def extend_registry(
    reference: CovariateRegistry, obs: pd.DataFrame
) -> tuple[CovariateRegistry, dict[str, list[str]]]:
    """The reference's registry with the query's unseen categories appended per key.

    Returns the new registry and ``{key: new categories}`` for keys that gained any. Model
    keys must be columns of ``obs``; metric-only keys (labels, dataset, technical) may be
    absent from the query.
    """
    model_keys = sorted({k for p in MODEL_PURPOSES for k in reference.purposes.get(p, [])})
    missing = [k for k in model_keys + reference.keys_for("continuous") if k not in obs.columns]
    if missing:
        users = {
            k: [p for p, keys in reference.purposes.items() if k in keys and p in MODEL_PURPOSES]
            for k in missing
        }
        raise KeyError(
            "query obs lacks the reference's covariate column(s) "
            + "; ".join(f"{k!r} (for {', '.join(v) or 'continuous'})" for k, v in users.items())
            + f". Available columns: {list(obs.columns)[:20]}"
        )
    categories = {k: list(v) for k, v in reference.categories.items()}
    added: dict[str, list[str]] = {}
    for key in reference.categorical_keys():
        if key not in obs.columns:
            continue
        col = obs[key]
        n_nan = int(col.isna().sum())
        if n_nan:
            raise ValueError(
                f"query obs[{key!r}] has {n_nan} missing (NaN) values; every cell needs a category"
            )
        known = set(categories[key])
        new = sorted(c for c in pd.unique(col.astype(str)) if c not in known)
        if new:
            categories[key] = categories[key] + new
            added[key] = new
    registry = CovariateRegistry(
        purposes={p: list(k) for p, k in reference.purposes.items()},
        categories=categories,
        continuous_stats={k: list(v) for k, v in reference.continuous_stats.items()},
        var_names=list(reference.var_names),
        layer=reference.layer,
    )
    return registry, added


# ---------------------------------------------------------------------------------- module
@dataclass
class KeyGrowth:
    """Old and new category counts of the keys of one purpose (in the module's key order)."""

    old: list[int]
    new: list[int]


@dataclass
class QueryParts:
    """Which entries of a query module are new (trainable) and the frozen reference values."""

    #: parameter name → boolean mask of entries that are new rows (technical terms)
    technical: dict[str, torch.Tensor] = field(default_factory=dict)
    #: parameter name → boolean mask of new one-hot columns of conditioning / encoder layers
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)
    encoder_columns: dict[str, torch.Tensor] = field(default_factory=dict)


def growth_of(old: CovariateRegistry, new: CovariateRegistry, keys: Sequence[str]) -> KeyGrowth:
    return KeyGrowth([len(old.categories[k]) for k in keys], [len(new.categories[k]) for k in keys])


def _column_map(n_in: int, growth: KeyGrowth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Old → new column indices of a layer fed ``[x (n_in), one-hot of kept keys]``.

    Keys with one category are not injected (:class:`regvi.nn.layers.CategoricalInjector`).
    Returns (old columns, their new positions, per new column the key index or −1 for x /
    a key that gained no columns, as a mask source) and a boolean "new category" mask.
    """
    old_cols, new_cols = list(range(n_in)), list(range(n_in))
    new_flags: list[bool] = [False] * n_in
    o_off, n_off = n_in, n_in
    for n_old, n_new in zip(growth.old, growth.new, strict=True):
        kept_old, kept_new = n_old > 1, n_new > 1
        if kept_new:
            if kept_old:
                old_cols.extend(range(o_off, o_off + n_old))
                new_cols.extend(range(n_off, n_off + n_old))
            new_flags.extend([False] * n_old + [True] * (n_new - n_old))
            n_off += n_new
        if kept_old:
            o_off += n_old
    return np.array(old_cols), np.array(new_cols), np.array(new_flags, dtype=bool)


def _grow_linear(
    old_w: torch.Tensor, new_w: torch.Tensor, n_in: int, growth: KeyGrowth
) -> torch.Tensor:
    """Copy ``old_w`` into a grown weight; new category columns = mean of the key's old ones."""
    old_cols, new_cols, is_new = _column_map(n_in, growth)
    out = torch.zeros_like(new_w)
    out[:, torch.as_tensor(new_cols)] = old_w[:, torch.as_tensor(old_cols)]
    off = n_in
    for n_old, n_new in zip(growth.old, growth.new, strict=True):
        if n_new > 1:
            if n_new > n_old and n_old > 1:
                mean = out[:, off : off + n_old].mean(dim=1, keepdim=True)
                out[:, off + n_old : off + n_new] = mean
            off += n_new
    assert out.shape[1] == len(is_new)
    return out


def _new_column_mask(shape: torch.Size, n_in: int, growth: KeyGrowth) -> torch.Tensor:
    _, _, is_new = _column_map(n_in, growth)
    return torch.as_tensor(is_new)[None, :].expand(shape).clone()


def _grow_rows(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference rows copied into ``new`` (whose extra rows keep their initial values)."""
    out = new.detach().clone()
    out[: old.shape[0]] = old
    mask = torch.zeros_like(out, dtype=torch.bool)
    mask[old.shape[0] :] = True
    return out, mask


def grow_module(
    reference: torch.nn.Module,
    query: torch.nn.Module,
    growth: Mapping[str, KeyGrowth],
    prefix: str = "",
) -> QueryParts:
    """Fill a freshly built query :class:`regvi.module.RegVIModule` from the reference's.

    ``growth`` maps ``"nn_conditioning"`` and ``"encoder"`` to their key growth; row-indexed
    technical parameters grow by their first axis. Returns the masks of new entries, keyed by
    ``prefix`` + parameter name.
    """
    parts = QueryParts()
    ref_state = reference.state_dict()
    new_state = query.state_dict()
    c = reference.config
    layers = {
        "decoder": ((c.n_latent_decoder or c.n_latent) + c.n_continuous, growth["nn_conditioning"]),
        "z_encoder": (c.n_genes + c.n_continuous, growth["encoder"]),
        "l_encoder": (c.n_genes + c.n_continuous, growth["encoder"]),
    }
    out: dict[str, torch.Tensor] = {}
    for name, new in new_state.items():
        old = ref_state[name]
        owner = name.split(".")[0]
        is_injected = ".body.linears." in name and name.endswith(".weight") and owner in layers
        if is_injected:
            n_in_first, key_growth = layers[owner]
            index = int(name.split(".body.linears.")[1].split(".")[0])
            n_in = n_in_first if index == 0 else c.n_hidden
            if old.shape == new.shape and key_growth.old == key_growth.new:
                out[name] = old.clone()
                continue
            out[name] = _grow_linear(old, new, n_in, key_growth)
            mask = _new_column_mask(new.shape, n_in, key_growth)
            target = parts.conditioning if owner == "decoder" else parts.encoder_columns
            if bool(mask.any()):
                target[prefix + name] = mask
        elif old.shape == new.shape:
            out[name] = old.clone()
        elif old.dim() == new.dim() and old.shape[1:] == new.shape[1:]:
            out[name], mask = _grow_rows(old, new)
            if not name.startswith("library_prior"):  # buffers: set from data, not trained
                parts.technical[prefix + name] = mask
        else:
            raise ValueError(
                f"cannot map reference parameter {name!r} {tuple(old.shape)} onto the query's "
                f"{tuple(new.shape)}"
            )
    query.load_state_dict(out, strict=True)
    return parts


# ---------------------------------------------------------------------------------- data init
@torch.no_grad()
def init_new_categories(
    module: torch.nn.Module,
    X: Any,
    cov: Mapping[str, np.ndarray],
    n_old: Mapping[str, list[int]],
    dispersion_init: str,
) -> None:
    """Library prior, ambient (and MoM theta) of the new categories from the query's counts.

    Counts are depth-normalised with the reference's library offset, so new ambient rows are
    on the reference's scale; reference rows are not touched.
    """
    offset = float(module.library_log_offset)
    totals = row_totals(X)
    nonzero = totals > 0
    log_lib = np.log(np.maximum(totals, 1.0))
    n_lib_old = n_old["library_size"][0] if n_old["library_size"] else 1
    n_lib = int(module.library_prior_mean.shape[0])
    if n_lib > n_lib_old:
        lib_codes = cov["library_size"][:, 0]
        means, variances, _ = _library_stats(log_lib, lib_codes, nonzero, nonzero, n_lib)
        module.library_prior_mean[n_lib_old:] = torch.as_tensor(
            means[n_lib_old:] - offset, dtype=module.library_prior_mean.dtype
        )
        module.library_prior_var[n_lib_old:] = torch.as_tensor(
            np.maximum(variances[n_lib_old:], 1e-4), dtype=module.library_prior_var.dtype
        )
    c = module.config
    G = X.shape[1]
    ambient = []
    if c.use_ambient:
        for k, param in enumerate(module.ambient_log):
            if param.shape[0] > n_old["ambient"][k]:
                ambient.append((k, _GroupMeans(cov["ambient"][nonzero, k], param.shape[0], G)))
    disp = None
    n_disp_old = n_old["dispersion"][0] if n_old["dispersion"] else 1
    if dispersion_init == "data" and module.log_theta_mean.shape[0] > n_disp_old:
        codes = cov["dispersion"][nonzero, 0]
        n_disp = module.log_theta_mean.shape[0]
        disp = (_GroupMeans(codes, n_disp, G), _GroupMeans(codes, n_disp, G))
    if not ambient and disp is None:
        return
    rows = np.flatnonzero(nonzero)
    for start, stop, block in iter_row_blocks(X):
        keep = nonzero[start:stop]
        if not keep.any():
            continue
        block = block if keep.all() else block[keep]
        sel = slice(int(np.searchsorted(rows, start)), int(np.searchsorted(rows, stop)))
        _, Xn = _depth_normalised_stats(block, offset)
        for k, acc in ambient:
            acc.add_rows(cov["ambient"][rows[sel], k], Xn)
        if disp is not None:
            codes = cov["dispersion"][rows[sel], 0]
            disp[0].add_rows(codes, Xn)
            disp[1].add_rows(codes, Xn.multiply(Xn) if sp.issparse(Xn) else Xn**2)
    n_keys = max(len(module.ambient_log), 1)
    for k, acc in ambient:
        start = n_old["ambient"][k]
        means = torch.as_tensor(acc.result()[start:], dtype=torch.float32)
        module.ambient_log[k][start:] = torch.log((0.2 * means / n_keys).clamp_min(1e-6))
    if disp is not None:
        m = disp[0].result()[n_disp_old:]
        v = disp[1].result()[n_disp_old:] - m**2
        theta = torch.as_tensor(m**2 / (0.1 * np.maximum(v - m, 1e-8)), dtype=torch.float32)
        theta = theta.clamp(0.01, 20.0)
        module.log_theta_mean[n_disp_old:] = torch.log(theta)
        lam = 1.0 / theta.rsqrt().mean(-1)
        module.dispersion_rate_prior_mean[n_disp_old:] = lam
        module.dispersion_rate_raw[n_disp_old:] = inverse_softplus(lam)


# ---------------------------------------------------------------------------------- training
def trainable_masks(parts: QueryParts, train: Sequence[str]) -> dict[str, torch.Tensor | None]:
    """Parameter name → mask of trainable entries (``None``: the whole tensor trains)."""
    masks: dict[str, torch.Tensor | None] = {}
    for name, mask in parts.technical.items():
        masks[name] = mask
    if "conditioning" in train:
        masks.update(parts.conditioning)
        masks.update(parts.encoder_columns)
    return masks


class QueryFreeze:
    """Freeze everything of a query module except the trainable entries, during ``train()``.

    Whole tensors without trainable entries get ``requires_grad=False`` (no gradient, so Adam
    skips them: no weight decay either). Partly trainable tensors get a gradient mask, and
    after every optimiser step their frozen entries are written back, so Adam's weight decay
    and moments cannot move them: the reference's weights stay byte-identical.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        masks: Mapping[str, torch.Tensor | None],
        train_encoder: bool,
    ):
        self.module = module
        self.masks: dict[str, torch.Tensor] = {}
        self.frozen_values: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._entries: list[list[torch.Tensor]] = []
        self._flags: dict[str, bool] = {}
        for name, param in module.named_parameters():
            self._flags[name] = param.requires_grad
            if (name in masks and masks[name] is None) or (train_encoder and _is_encoder(name)):
                continue
            mask = masks.get(name)
            if mask is None:
                param.requires_grad_(False)
                continue
            mask = mask.to(param.device)
            self.masks[name] = mask
            self.frozen_values[name] = param.detach()[~mask].clone()
            # per parameter: the frozen-entry mask, their values, the gradient factor (moved to
            # the parameter's device and dtype once, not every step)
            self._entries.append([param, ~mask, self.frozen_values[name], mask.to(param.dtype)])
            self._hooks.append(param.register_hook(self._gradient_mask(len(self._entries) - 1)))

    def _on_device(self, k: int, device: torch.device) -> list[torch.Tensor]:
        entry = self._entries[k]
        if entry[1].device != device:  # the module moved (e.g. to a GPU) after the freeze
            entry[1:] = [t.to(device) for t in entry[1:]]
        return entry

    def _gradient_mask(self, k: int) -> Any:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            factor = self._on_device(k, grad.device)[3]
            return grad * (factor if factor.dtype == grad.dtype else factor.to(grad.dtype))

        return hook

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen entries back (after an optimiser step)."""
        for k, (param, *_) in enumerate(self._entries):
            _, frozen, values, _ = self._on_device(k, param.device)
            param[frozen] = values

    def release(self) -> None:
        """Undo the freeze (hooks removed, requires_grad as before)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for name, param in self.module.named_parameters():
            param.requires_grad_(self._flags.get(name, True))

    def callback(self) -> Any:
        """A Lightning callback that restores frozen entries after every training batch."""
        import lightning.pytorch as pl

        freeze = self

        class _Restore(pl.Callback):
            def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
                freeze.restore()

        return _Restore()


def _is_encoder(name: str) -> bool:
    parts = name.split(".")
    return any(p in ("z_encoder", "l_encoder") for p in parts)
