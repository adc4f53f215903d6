"""MLflow "model from code": a pyfunc wrapping a regvi safetensors directory.

``predict(AnnData)`` returns the latent (posterior mean); a multimodal model takes a MuData or a
dict modality → AnnData and returns the joint latent. Nothing is pickled: MLflow stores this
file and the model directory (``artifacts["regvi_model"]``).
"""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.models import set_model


class RegVIPyfunc(mlflow.pyfunc.PythonModel):
    """Latent of an AnnData under a saved regvi model."""

    def load_context(self, context) -> None:
        import regvi

        self.model = regvi.load(context.artifacts["regvi_model"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        from anndata import AnnData

        if isinstance(self.model, __import__("regvi").RegMultiVI):
            return np.asarray(self.model.get_latent_representation(model_input))
        if not isinstance(model_input, AnnData):
            raise TypeError(
                f"predict expects an AnnData with the model's genes; got {type(model_input).__name__}"
            )
        return np.asarray(self.model.get_latent_representation(model_input))


set_model(RegVIPyfunc())
