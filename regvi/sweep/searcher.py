"""The Optuna searcher of a sweep (imported only when a sweep runs: it imports Ray)."""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch


class FinalResultOptunaSearch(OptunaSearch):
    """OptunaSearch that forwards a per-epoch result only when it holds the objective.

    Evaluation objectives (scib, neighbourhood) arrive with the trial's final report; the
    epochs before it carry the validation ELBO that ASHA prunes on. Optuna's per-epoch hook
    would otherwise fail on every epoch without the objective. The final result completes the
    Optuna trial as usual.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if all(m in result for m in metrics):
            super().on_trial_result(trial_id, result)
