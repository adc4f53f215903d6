"""MLflow "model from code": a pyfunc wrapping a regvi safetensors directory.

``predict(AnnData)`` returns the latent (posterior mean); a multimodal model takes a MuData or a
dict modality → AnnData and returns the joint latent. Nothing is pickled: MLflow stores this
file and the model directory (``artifacts["regvi_model"]``).

Cells of categories the model has not seen (a new library, say) are mapped the way
``python -m regvi.map`` maps them (:meth:`regvi.RegVI.load_query_data`), so a registered atlas
model encodes new data without retraining.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
from mlflow.models import set_model


def unseen_categories(model: Any, adata: Any) -> dict[str, list[str]]:
    """Categories of ``adata.obs`` that ``model`` (a RegVI) has not seen, per covariate key.

    Only the keys the model uses (ambient, dispersion, library size, decoder conditioning,
    feature scaling, encoder covariates) count; a key absent from ``obs`` is left to the
    model's own check.
    """
    import pandas as pd

    from regvi.data.registry import MODEL_PURPOSES

    reg = model.registry
    keys = sorted({k for p in MODEL_PURPOSES for k in reg.purposes.get(p, [])})
    out: dict[str, list[str]] = {}
    for key in keys:
        if key not in adata.obs.columns or key not in reg.categories:
            continue
        known = {str(c) for c in reg.categories[key]}
        values = pd.unique(adata.obs[key].dropna().astype(str))
        new = sorted(v for v in values if v not in known)
        if new:
            out[key] = new
    return out


class RegVIPyfunc(mlflow.pyfunc.PythonModel):
    """Latent of an AnnData under a saved regvi model (new categories mapped as a query)."""

    def load_context(self, context) -> None:
        import regvi

        self.model = regvi.load(context.artifacts["regvi_model"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        from anndata import AnnData

        import regvi

        if isinstance(self.model, regvi.RegMultiVI):
            return np.asarray(self.model.get_latent_representation(model_input))
        if not isinstance(model_input, AnnData):
            raise TypeError(
                f"predict expects an AnnData with the model's genes; got {type(model_input).__name__}"
            )
        if unseen_categories(self.model, model_input):
            # A new library (or other category): build a query model that shares the
            # reference's weights and gives the new categories their own technical terms.
            # No training is needed here: the latent is the encoder's posterior mean, and the
            # encoder (with its one-hot inputs of the new categories, at their initial values)
            # is the reference's; query training only fits the decoder-side technical terms
            # (ambient, dispersion, library prior, feature scaling), which the latent does
            # not depend on. Genes are matched by name, as in load_query_data.
            query = regvi.RegVI.load_query_data(model_input, self.model)
            return np.asarray(query.get_latent_representation())
        return np.asarray(self.model.get_latent_representation(model_input))


set_model(RegVIPyfunc())
