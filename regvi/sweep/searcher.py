"""The Optuna searcher of a sweep (Ray Tune's OptunaSearch, for final-report objectives)."""

from __future__ import annotations

import logging

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)


class FinalResultOptunaSearch(OptunaSearch):
    """OptunaSearch that forwards a per-epoch result only when it holds the objective.

    Evaluation objectives (scib, neighbourhood) arrive with the trial's final report; the
    epochs before it carry the validation ELBO that ASHA prunes on. Optuna's per-epoch hook
    would otherwise fail on every epoch without the objective. The final result completes the
    Optuna trial as usual.

    After a driver crash and ``--resume``, Tune's saved state can be older than the Optuna
    study: a trial Optuna already completed is restored as running and replays its final
    result. That replay is recognised and skipped (Optuna keeps the value it recorded) instead
    of failing the sweep with ``UpdateFinishedTrialError``.
    """

    def restore(self, checkpoint_path: str) -> None:
        """Restore Tune's saved searcher, then fail the Optuna trials it does not know.

        A trial Optuna was asked for after Tune last saved this searcher (the driver was then
        killed) is left RUNNING in the study for ever; no Tune trial will report to it. It is
        marked FAIL with the user attribute ``regvi.orphaned_by_resume``, so the study's
        running and finished trials match Tune's and MLflow's."""
        super().restore(checkpoint_path)
        known = {t.number for t in self._ot_trials.values()}
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number in known:
                continue
            self._ot_study._storage.set_trial_user_attr(
                t._trial_id, "regvi.orphaned_by_resume", True
            )
            self._ot_study.tell(t.number, state=TrialState.FAIL)
            logger.info("Optuna trial %d: orphaned by the driver's crash, marked FAIL", t.number)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if not all(m in result for m in metrics):
            return
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            logger.info("trial %s: Optuna already recorded it (replayed after --resume)", trial_id)
            self._completed_trials.add(trial_id)
