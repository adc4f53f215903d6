"""scvi-tools scArches (or de novo SCVI) on one mapping split (run by ``bench_mapping.py``).

Runs in the scvi-tools virtualenv (``benchmarks/setup_scvi_env.sh``), so it imports nothing
from regvi.

* ``arches``: SCVI on the reference cells with its defaults (ZINB, default ``max_epochs``
  heuristic, early stopping on the validation ELBO; only ``n_hidden`` / ``n_latent`` and the
  seed set), then scArches as the scvi-tools reference-mapping tutorial does it:
  ``SCVI.prepare_query_anndata`` + ``SCVI.load_query_data(query, reference)`` (its default
  freezing) + ``train(max_epochs=200, plan_kwargs=dict(weight_decay=0.0))``. The joint latent
  is the query model's posterior mean of the reference and the query cells.
* ``denovo``: SCVI with its defaults on all cells.

Writes ``OUT.npy`` (latent of every cell, in the data file's order) and ``OUT.json`` (wall
seconds and epochs of each fit).

Usage: ``python mapping_scvi_child.py MODE DATA.h5ad BATCH_KEY QUERY_LIBS N_HIDDEN N_LATENT SEED
THREADS OUT`` (``QUERY_LIBS`` comma-separated; ``OUT`` without suffix).
"""

from __future__ import annotations

import json
import sys
import time


def _epochs(model) -> int | None:
    history = model.history.get("elbo_train")
    return len(history) if history is not None else None


def main() -> None:
    mode, data, key, query_libs, n_hidden, n_latent, seed, threads, out = sys.argv[1:10]
    import anndata as ad
    import numpy as np
    import scvi
    import torch

    scvi.settings.seed = int(seed)
    torch.set_num_threads(int(threads))
    adata = ad.read_h5ad(data)
    fit = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
    sizes = {"n_hidden": int(n_hidden), "n_latent": int(n_latent)}
    record: dict = {"scvi_tools": scvi.__version__, "torch": torch.__version__}
    latent = np.zeros((adata.n_obs, int(n_latent)), dtype=np.float32)
    if mode == "denovo":
        scvi.model.SCVI.setup_anndata(adata, batch_key=key)
        model = scvi.model.SCVI(adata, **sizes)
        t0 = time.perf_counter()
        model.train(early_stopping=True, **fit)
        record.update(train_s=round(time.perf_counter() - t0, 1), epochs=_epochs(model))
        latent[:] = model.get_latent_representation()
    elif mode == "arches":
        is_query = adata.obs[key].astype(str).isin(query_libs.split(",")).to_numpy()
        ref = adata[~is_query].copy()
        query = adata[is_query].copy()
        scvi.model.SCVI.setup_anndata(ref, batch_key=key)
        model = scvi.model.SCVI(ref, **sizes)
        t0 = time.perf_counter()
        model.train(early_stopping=True, **fit)
        record.update(ref_train_s=round(time.perf_counter() - t0, 1), ref_epochs=_epochs(model))
        scvi.model.SCVI.prepare_query_anndata(query, model)
        q = scvi.model.SCVI.load_query_data(query, model, accelerator="cpu", device="auto")
        t0 = time.perf_counter()
        q.train(max_epochs=200, plan_kwargs={"weight_decay": 0.0}, **fit)
        record.update(query_train_s=round(time.perf_counter() - t0, 1), query_epochs=_epochs(q))
        latent[is_query] = q.get_latent_representation()
        latent[~is_query] = q.get_latent_representation(ref)
    else:
        raise SystemExit(f"mode: expected 'arches' or 'denovo', got {mode!r}")
    np.save(f"{out}.npy", latent)
    with open(f"{out}.json", "w") as fh:
        json.dump(record, fh)


if __name__ == "__main__":
    main()
