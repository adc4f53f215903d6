"""PNG plots of training: loss curves per epoch (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
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
