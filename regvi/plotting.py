"""PNG plots of training (loss curves per epoch) and modality attribution (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from evaluation.plots import save_figure
from evaluation.plots import umap_2d as umap_2d  # the one UMAP helper, re-exported


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
    return save_figure(fig, path)


def plot_attribution(
    attribution: Any,
    coords: np.ndarray,
    labels: Any = None,
    path: str | Path | None = None,
) -> Any:
    """UMAP coloured by log2 attribution ratio (2 modalities) or the leading block (3+).

    A second panel shows ``labels`` (cell types) when given, and a third the ratio's
    distribution per label, so one sees which cell types each modality's latent drives.
    """
    per_cell = attribution.per_cell
    mods = attribution.modalities
    n_panels = 1 + (labels is not None) * 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5.8 * n_panels, 4.8), squeeze=False)
    axes = axes[0]
    order = np.random.default_rng(0).permutation(len(coords))
    ax = axes[0]
    if "log2_ratio" in per_cell:
        r = per_cell["log2_ratio"].to_numpy()
        lim = float(np.nanpercentile(np.abs(r - np.nanmedian(r)), 98)) or 1.0
        centre = float(np.nanmedian(r))
        sc_ = ax.scatter(
            coords[order, 0],
            coords[order, 1],
            c=r[order],
            cmap="coolwarm",
            vmin=centre - lim,
            vmax=centre + lim,
            s=3,
            linewidths=0,
            rasterized=True,
        )
        fig.colorbar(sc_, ax=ax, label=f"log2 ||J_{mods[0]}|| / ||J_{mods[1]}||")
        target = getattr(attribution, "target", "rho")
        ax.set_title(f"attribution of {target}: {mods[0]} (red) vs {mods[1]} (blue)")
    else:
        blocks = np.stack([per_cell[f"jacobian_{m}"] for m in mods], axis=1)
        lead = blocks.argmax(1)
        cmap = plt.get_cmap("tab10")
        ax.scatter(coords[order, 0], coords[order, 1], c=cmap(lead[order]), s=3, linewidths=0)
        ax.legend(
            handles=[
                plt.Line2D([], [], marker="o", ls="", color=cmap(i), label=m)
                for i, m in enumerate(mods)
            ],
            frameon=False,
        )
        ax.set_title("leading latent block per cell")
    if labels is not None:
        cats = pd.Categorical(np.asarray(labels).astype(str))
        cmap = plt.get_cmap("tab20")
        axes[1].scatter(
            coords[order, 0],
            coords[order, 1],
            c=cmap(cats.codes[order] % cmap.N),
            s=3,
            linewidths=0,
            rasterized=True,
        )
        for i, c in enumerate(cats.categories):
            sel = cats.codes == i
            if sel.sum():
                x, y = np.median(coords[sel], axis=0)
                axes[1].text(x, y, c, fontsize=6, ha="center", va="center")
        axes[1].set_title("cell type")
        value = (
            per_cell["log2_ratio"].to_numpy()
            if "log2_ratio" in per_cell
            else per_cell[f"jacobian_{mods[0]}"].to_numpy()
        )
        df = pd.DataFrame({"label": cats.astype(str), "v": value})
        med = df.groupby("label")["v"].median().sort_values()
        data = [df.loc[df.label == lab, "v"].to_numpy() for lab in med.index]
        axes[2].boxplot(data, orientation="horizontal", showfliers=False)
        axes[2].set_yticks(range(1, len(med) + 1), med.index, fontsize=6)
        axes[2].set_xlabel("log2 ratio" if "log2_ratio" in per_cell else f"||J_{mods[0]}||")
        axes[2].set_title("attribution per cell type")
    for a in axes[: 1 + (labels is not None)]:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
