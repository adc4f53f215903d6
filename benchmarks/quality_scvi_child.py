"""scvi-tools SCVI with its defaults on one prepared dataset (run by ``bench_quality.py``).

Runs in the scvi-tools virtualenv (``benchmarks/setup_scvi_env.sh``), so it imports nothing
from regvi. SCVI is trained the way its documentation trains it: default likelihood (ZINB),
default ``max_epochs`` heuristic, early stopping on the validation ELBO; only ``n_hidden`` /
``n_latent`` and the seed are set. Writes the latent posterior mean (``.npy``) and a JSON
record (wall seconds, epochs run).

Usage: ``python quality_scvi_child.py DATA.h5ad BATCH_KEY N_HIDDEN N_LATENT SEED THREADS OUT``
(``OUT`` without suffix; writes ``OUT.npy`` and ``OUT.json``).
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    data, batch_key, n_hidden, n_latent, seed, threads, out = sys.argv[1:8]
    import anndata as ad
    import numpy as np
    import scvi
    import torch

    scvi.settings.seed = int(seed)
    torch.set_num_threads(int(threads))
    adata = ad.read_h5ad(data)
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.SCVI(adata, n_hidden=int(n_hidden), n_latent=int(n_latent))
    t0 = time.perf_counter()
    model.train(early_stopping=True, accelerator="cpu", devices=1, enable_progress_bar=False)
    wall = time.perf_counter() - t0
    np.save(f"{out}.npy", model.get_latent_representation().astype(np.float32))
    history = model.history.get("elbo_validation")
    record = {
        "train_s": round(wall, 1),
        "epochs": len(history) if history is not None else None,
        "scvi_tools": scvi.__version__,
        "torch": torch.__version__,
    }
    with open(f"{out}.json", "w") as fh:
        json.dump(record, fh)


if __name__ == "__main__":
    main()
