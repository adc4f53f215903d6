"""Simulated counts with known ground truth, for tests and benchmarks.

Generative story (matching the regvi model family)::

    cell type k:   expression profile p_k = softmax(base + s · programme_k)   (simplex over genes;
                   programme = N(0.5, 0.5) where the gene is on in type k, −1 where off)
    library b:     ambient profile a_b ~ Dirichlet, depth D_b, ambient fraction f_b
    technology t:  optional feature-scaling bias y_{t,g} (log-normal around 1)
    cell n:        L_n = D_b · LogNormal(0, depth_sd)
                   mu_ng = L_n · ((1 − f_b) · p_{k_n,g} + f_b · a_{b,g}) · y_{t_n,g}
                   x_ng ~ NegativeBinomial(mean mu_ng, inverse dispersion theta_g)
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover
    from typing_extensions import Unpack

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

logger = logging.getLogger(__name__)


def simulate(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_cell_types: int = 5,
    n_libraries: int = 4,
    depth_range: tuple[float, float] = (1000.0, 4000.0),
    depth_sd: float = 0.3,
    ambient_fraction: float | tuple[float, float] = (0.05, 0.2),
    theta: float | tuple[float, float] = (3.0, 20.0),
    programme_strength: float = 2.0,
    n_technologies: int = 0,
    feature_scaling_sd: float = 0.3,
    sparse_format: str = "csr",
    seed: int = 0,
) -> AnnData:
    """Simulate a raw-count AnnData with known cell types, ambient profiles and dispersion.

    Parameters
    ----------
    n_cells, n_genes
        Size of the count matrix.
    n_cell_types
        Number of cell types (``obs["cell_type"]``).
    n_libraries
        Number of libraries (``obs["library"]``), each with its own ambient profile and depth.
    depth_range
        Library mean depths are spread evenly (log scale) over this range.
    depth_sd
        Per-cell log-normal spread of depth around the library mean.
    ambient_fraction
        Share of each library's counts that is ambient (scalar, or a (low, high) range).
    theta
        NB inverse dispersion per gene (scalar, or log-uniform range).
    programme_strength
        Scale of cell-type programmes (higher → more separable types).
    n_technologies
        If > 0, adds ``obs["technology"]`` with that many levels, each with a multiplicative
        per-gene bias (log-normal, sd ``feature_scaling_sd``).
    sparse_format
        ``"csr"``, ``"csc"`` or ``"dense"``.
    seed
        Random seed.

    Returns
    -------
    AnnData
        Counts in ``X`` (int32); truth in ``uns["truth"]``: ``type_profiles`` (types × genes),
        ``ambient_profiles`` (libraries × genes, on the simplex), ``ambient_fraction``,
        ``library_depth``, ``theta`` (genes), ``feature_scaling`` (technologies × genes).
    """
    rng, truth = _seeded_truth(seed, locals())
    counts, codes = _draw_cells(rng, truth, n_cells, depth_sd, n_technologies, feature_scaling_sd)
    if sparse_format == "csr":
        X = sp.csr_matrix(counts)
    elif sparse_format == "csc":
        X = sp.csc_matrix(counts)
    elif sparse_format == "dense":
        X = counts
    else:
        raise ValueError(f"sparse_format={sparse_format!r}; expected 'csr', 'csc' or 'dense'")
    adata = AnnData(X=X, obs=_obs_frame(codes), var=_var_frame(n_genes))
    adata.uns["truth"] = truth
    return adata


#: The arguments of :func:`simulate` (and :func:`simulate_to_mmap`) that the truth is drawn from.
_TRUTH_ARGS = (
    "n_genes",
    "n_cell_types",
    "n_libraries",
    "depth_range",
    "ambient_fraction",
    "theta",
    "programme_strength",
)


def _seeded_truth(
    seed: int, arguments: Mapping[str, Any]
) -> tuple[np.random.Generator, dict[str, Any]]:
    """The generator of ``seed`` and the truth drawn first from it, for the simulation
    ``arguments`` (the caller's ``locals()``); cells are drawn next from the same generator."""
    rng = np.random.default_rng(seed)
    return rng, _draw_truth(rng, *(arguments[name] for name in _TRUTH_ARGS))


def _draw_truth(
    rng: np.random.Generator,
    n_genes: int,
    n_cell_types: int,
    n_libraries: int,
    depth_range: tuple[float, float],
    ambient_fraction: float | tuple[float, float],
    theta: float | tuple[float, float],
    programme_strength: float,
) -> dict[str, Any]:
    """Type profiles, ambient profiles, depths, ambient fractions and theta (drawn once)."""
    base = rng.normal(0.0, 1.0, n_genes)
    # each gene is "on" in a random subset of types and strongly down elsewhere, so that
    # (as for real marker genes) the minimum over types is low and ambient is identifiable
    on = rng.random((n_cell_types, n_genes)) < 0.4
    programmes = np.where(on, rng.normal(0.5, 0.5, (n_cell_types, n_genes)), -1.0)
    logits = base + programme_strength * programmes
    type_profiles = np.exp(logits - logits.max(1, keepdims=True))
    type_profiles /= type_profiles.sum(1, keepdims=True)
    ambient_profiles = rng.dirichlet(np.full(n_genes, 0.3), size=n_libraries)
    depths = np.exp(np.linspace(np.log(depth_range[0]), np.log(depth_range[1]), n_libraries))
    if np.isscalar(ambient_fraction):
        fractions = np.full(n_libraries, float(ambient_fraction))
    else:
        fractions = rng.uniform(*ambient_fraction, n_libraries)
    if np.isscalar(theta):
        thetas = np.full(n_genes, float(theta))
    else:
        thetas = np.exp(rng.uniform(np.log(theta[0]), np.log(theta[1]), n_genes))
    return {
        "type_profiles": type_profiles,
        "ambient_profiles": ambient_profiles,
        "ambient_fraction": fractions,
        "library_depth": depths,
        "theta": thetas,
        "feature_scaling": None,  # drawn with the first cells (as simulate always has)
    }


def _draw_cells(
    rng: np.random.Generator,
    truth: dict[str, Any],
    n_cells: int,
    depth_sd: float,
    n_technologies: int,
    feature_scaling_sd: float,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Dense int32 counts and codes of ``n_cells`` cells; sets ``truth["feature_scaling"]``
    on the first call (after the first cells' types, libraries and sizes)."""
    type_profiles, ambient_profiles = truth["type_profiles"], truth["ambient_profiles"]
    n_cell_types, n_genes = type_profiles.shape
    n_libraries = ambient_profiles.shape[0]
    thetas = truth["theta"]
    cell_type = rng.integers(0, n_cell_types, n_cells)
    library = rng.integers(0, n_libraries, n_cells)
    size = truth["library_depth"][library] * np.exp(rng.normal(0.0, depth_sd, n_cells))
    frac = truth["ambient_fraction"][library][:, None]
    mu = size[:, None] * ((1 - frac) * type_profiles[cell_type] + frac * ambient_profiles[library])
    codes = {"cell_type": cell_type, "library": library}
    if truth["feature_scaling"] is None:
        truth["feature_scaling"] = (
            np.exp(rng.normal(0.0, feature_scaling_sd, (n_technologies, n_genes)))
            if n_technologies > 0
            else np.ones((1, n_genes))
        )
    if n_technologies > 0:
        tech = rng.integers(0, n_technologies, n_cells)
        mu = mu * truth["feature_scaling"][tech]
        codes["technology"] = tech
    # NB(mean mu, inverse dispersion theta) as a Gamma–Poisson mixture
    rate = rng.gamma(shape=thetas[None, :], scale=mu / thetas[None, :])
    del mu
    return rng.poisson(rate).astype(np.int32), codes


def _obs_frame(codes: dict[str, np.ndarray]) -> pd.DataFrame:
    prefixes = {"cell_type": "type", "library": "lib", "technology": "tech"}
    n_cells = len(codes["cell_type"])
    return pd.DataFrame(
        {
            key: pd.Categorical([f"{prefixes[key]}_{c}" for c in values])
            for key, values in codes.items()
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )


def _var_frame(n_genes: int) -> pd.DataFrame:
    return pd.DataFrame(index=[f"gene_{g}" for g in range(n_genes)])


class SimulationParams(TypedDict, total=False):
    """The simulation parameters of :func:`simulate` that :func:`simulate_to_mmap` takes as
    keyword arguments; documented, with their defaults, at :func:`simulate`."""

    n_cell_types: int
    n_libraries: int
    depth_range: tuple[float, float]
    depth_sd: float
    ambient_fraction: float | tuple[float, float]
    theta: float | tuple[float, float]
    programme_strength: float
    n_technologies: int
    feature_scaling_sd: float


def _simulation_params(caller: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` over :func:`simulate`'s defaults; a TypeError names an unknown one."""
    names = SimulationParams.__annotations__
    for name in params:
        if name not in names:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
    defaults = inspect.signature(simulate).parameters
    return {name: params.get(name, defaults[name].default) for name in names}


def simulate_to_mmap(
    path: str | os.PathLike,
    n_cells: int = 100_000,
    n_genes: int = 2000,
    chunk_cells: int = 50_000,
    seed: int = 0,
    overwrite: bool = False,
    **params: Unpack[SimulationParams],
) -> AnnData:
    """:func:`simulate` straight to a memory-mapped CSR directory, ``chunk_cells`` cells at a time.

    Profiles, ambient, depths and theta are drawn once from ``seed`` exactly as in
    :func:`simulate`; cells are drawn chunk by chunk from the same generator, so with
    ``chunk_cells >= n_cells`` the result equals ``simulate(..., seed=seed)`` (otherwise it is
    the same model, with different cell draws). Memory: a few dense ``chunk_cells × n_genes``
    float64 arrays at a time. (With ``n_technologies > 0`` the technology biases are drawn
    after the first chunk's cells, as in :func:`simulate`, so they depend on ``chunk_cells``.)

    ``params`` are :func:`simulate`'s simulation parameters (:class:`SimulationParams`), with
    its defaults.

    Writes to ``path``: the matrix (``data.npy``, ``indices.npy``, ``indptr.npy``,
    ``meta.json``, see :mod:`regvi.data.mmap`), ``obs.csv`` (``cell_type``, ``library``
    [, ``technology``]), ``var.csv`` and ``truth.npz`` (the ground truth of ``uns["truth"]``).
    No pickle. Reopen with :func:`regvi.data.mmap.open_mmap_anndata`.

    Returns
    -------
    AnnData
        ``X`` = the memory-mapped CSR (int32 counts), ``obs`` / ``var`` / ``uns["truth"]`` in
        memory, as :func:`simulate` returns them.
    """
    from regvi.data.mmap import _annotations_to_csv, open_mmap_csr, write_mmap_csr

    if chunk_cells < 1:
        raise ValueError(f"chunk_cells={chunk_cells}; expected a positive integer")
    path = Path(path)
    p = _simulation_params("simulate_to_mmap", params)
    rng, truth = _seeded_truth(seed, {**p, "n_genes": n_genes})
    cell_params = (p["depth_sd"], p["n_technologies"], p["feature_scaling_sd"])
    codes: list[dict[str, np.ndarray]] = []

    def chunks():
        t0 = time.perf_counter()
        for start in range(0, n_cells, chunk_cells):
            n = min(chunk_cells, n_cells - start)
            counts, chunk_codes = _draw_cells(rng, truth, n, *cell_params)
            codes.append(chunk_codes)
            yield sp.csr_matrix(counts)
            logger.info(
                "simulate_to_mmap: %d / %d cells (%.0f s)",
                start + n,
                n_cells,
                time.perf_counter() - t0,
            )

    write_mmap_csr(path, chunks(), n_genes, dtype=np.int32, overwrite=overwrite)
    all_codes = {k: np.concatenate([c[k] for c in codes]) for k in codes[0]} if codes else {}
    if not all_codes:
        all_codes = {"cell_type": np.zeros(0, np.int64), "library": np.zeros(0, np.int64)}
    obs, var = _obs_frame(all_codes), _var_frame(n_genes)
    _annotations_to_csv(obs, path / "obs.csv")
    _annotations_to_csv(var, path / "var.csv")
    np.savez(path / "truth.npz", **truth)
    adata = AnnData(X=open_mmap_csr(path), obs=obs, var=var)
    adata.uns["truth"] = truth
    return adata


def simulate_multiome(
    n_peaks: int = 2000,
    atac_depth_range: tuple[float, float] = (300.0, 1000.0),
    specific_fraction: float = 0.1,
    **rna_params: Any,
) -> dict[str, AnnData]:
    """Simulate paired RNA + ATAC counts of the same cells (for tests and examples).

    RNA is :func:`simulate`; ATAC gives every cell type a set of open peaks
    (``specific_fraction`` of all peaks, plus a shared background), Poisson counts at a
    per-library depth, clipped at 4 (ATAC counts are small: 1–2 alleles per peak per nucleus).

    Parameters
    ----------
    n_peaks
        Number of ATAC peaks.
    atac_depth_range
        Mean ATAC depth of the first and the last library (log-spaced between).
    specific_fraction
        Share of the peaks open in each cell type.
    **rna_params
        Arguments of :func:`simulate` (``n_cells``, ``n_genes``, ``n_cell_types``,
        ``n_libraries``, ``seed``, ...), with its defaults; they shape both modalities.

    Returns
    -------
    dict
        ``{"atac": AnnData, "rna": AnnData}`` with identical obs (``cell_type``, ``library``);
        the ATAC truth (``open_peaks``, types × peaks, bool) is in ``uns["truth"]``.
    """
    try:
        bound = inspect.signature(simulate).bind(**rna_params)
    except TypeError as err:
        raise TypeError(f"simulate_multiome(): {err}") from None
    bound.apply_defaults()
    p = bound.arguments
    n_cells, n_cell_types, n_libraries, seed = (
        p["n_cells"],
        p["n_cell_types"],
        p["n_libraries"],
        p["seed"],
    )
    rna = simulate(**p)
    rng = np.random.default_rng(seed + 1)
    cell_type = rna.obs["cell_type"].cat.codes.to_numpy()
    library = rna.obs["library"].cat.codes.to_numpy()
    open_peaks = rng.random((n_cell_types, n_peaks)) < specific_fraction
    profile = np.where(open_peaks, 1.0, 0.05) * rng.gamma(2.0, 0.5, n_peaks)[None, :]
    profile /= profile.sum(1, keepdims=True)
    depths = np.exp(
        np.linspace(np.log(atac_depth_range[0]), np.log(atac_depth_range[1]), n_libraries)
    )
    size = depths[library] * np.exp(rng.normal(0.0, 0.3, n_cells))
    counts = np.minimum(rng.poisson(size[:, None] * profile[cell_type]), 4).astype(np.int32)
    atac = AnnData(
        X=sp.csr_matrix(counts),
        obs=rna.obs.copy(),
        var=pd.DataFrame(index=[f"peak_{p}" for p in range(n_peaks)]),
    )
    atac.uns["truth"] = {"open_peaks": open_peaks}
    return {"atac": atac, "rna": rna}
