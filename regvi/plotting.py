"""PNG plots of a trained model: training curves and latent UMAPs (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def plot_training_curves(history: pd.DataFrame, path: str | Path) -> Path:
    """Train/validation ELBO, KL terms and KL weight per epoch, one PNG."""
    path = Path(path)
    panels = [
        ("elbo", "ELBO (recon + KL_z + KL_l)"),
        ("reconstruction", "reconstruction"),
        ("kl_z", "KL(q(z) || p(z))"),
        ("global", "global priors / N_train"),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.2))
    for ax, (term, title) in zip(axes, panels, strict=False):
        for split, style in (("train", "-"), ("validation", "--")):
            col = f"{split}_{term}"
            if col in history:
                ax.plot(history["epoch"], history[col], style, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    ax = axes[-1]
    ax.plot(history["epoch"], history["kl_weight"], color="k", label="KL weight")
    if "validation_n_active_dims" in history:
        ax2 = ax.twinx()
        ax2.plot(history["epoch"], history["validation_n_active_dims"], color="tab:red")
        ax2.set_ylabel("active latent dims", color="tab:red")
    ax.set_title("KL warmup / active dims")
    ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_embedding(
    coords: np.ndarray,
    obs: pd.DataFrame,
    keys: Sequence[str],
    path: str | Path,
    title: str = "UMAP",
) -> Path:
    """Scatter of 2-d ``coords`` coloured by each obs key (categorical), one panel per key."""
    path = Path(path)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.6), squeeze=False)
    order = np.random.default_rng(0).permutation(len(coords))  # no category drawn on top
    for ax, key in zip(axes[0], keys, strict=True):
        cats = pd.Categorical(obs[key].astype(str))
        cmap = plt.get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
        colors = cmap(cats.codes[order] % cmap.N)
        ax.scatter(coords[order, 0], coords[order, 1], c=colors, s=2, linewidths=0, rasterized=True)
        handles = [
            plt.Line2D([], [], marker="o", ls="", color=cmap(i % cmap.N), label=c)
            for i, c in enumerate(cats.categories)
        ]
        ax.legend(
            handles=handles,
            fontsize=6,
            markerscale=0.8,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
        )
        ax.set_title(f"{title}: {key}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def umap_coords(latent: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-d UMAP of a latent (scanpy neighbours + UMAP)."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(X=np.zeros((latent.shape[0], 1), dtype=np.float32))
    tmp.obsm["X_latent"] = latent
    sc.pp.neighbors(tmp, use_rep="X_latent", n_neighbors=n_neighbors, random_state=seed)
    sc.tl.umap(tmp, random_state=seed)
    return np.asarray(tmp.obsm["X_umap"])
