"""The sweep's Optuna searcher against a real Optuna SQLite study."""

from __future__ import annotations

import optuna
import pytest

from regvi.sweep.searcher import FinalResultOptunaSearch


def _searcher(tmp_path) -> FinalResultOptunaSearch:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    return FinalResultOptunaSearch(
        space={"n_hidden": optuna.distributions.CategoricalDistribution([64, 128])},
        metric="scib_total",
        mode="max",
        sampler=optuna.samplers.RandomSampler(seed=0),
        study_name="replay",
        storage=storage,
    )


def test_epoch_results_without_the_objective_are_not_forwarded(tmp_path):
    s = _searcher(tmp_path)
    s.suggest("t1")
    s.on_trial_result("t1", {"elbo_validation": 400.0, "training_iteration": 1})
    study = optuna.load_study(study_name="replay", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.trials[0].intermediate_values == {}


def test_a_final_result_replayed_after_resume_keeps_optunas_value(tmp_path):
    # The driver saved Tune's state (searcher included) while trial t1 was running, then t1
    # completed in Optuna, then the driver was killed. On --resume Tune restores the older
    # searcher, t1 runs again and replays its final result: the sweep must go on.
    s = _searcher(tmp_path)
    s.suggest("t1")
    s.save(str(tmp_path / "searcher-state.pkl"))
    final = {"scib_total": 0.61, "training_iteration": 7, "final": 1.0}
    s.on_trial_result("t1", final)
    s.on_trial_complete("t1", final)

    restored = _searcher(tmp_path)
    restored.restore(str(tmp_path / "searcher-state.pkl"))
    assert "t1" not in restored._completed_trials
    replay = {**final, "scib_total": 0.5}
    restored.on_trial_result("t1", replay)  # Optuna raised UpdateFinishedTrialError here
    restored.on_trial_complete("t1", replay)
    study = optuna.load_study(study_name="replay", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.value == pytest.approx(0.61)
    assert trial.intermediate_values == {7: pytest.approx(0.61)}
    # the next trial is still sampled and recorded
    restored.suggest("t2")
    restored.on_trial_complete("t2", {**final, "scib_total": 0.7})
    assert [t.value for t in optuna.load_study(study_name="replay", storage=s._storage).trials] == [
        pytest.approx(0.61),
        pytest.approx(0.7),
    ]


def test_an_optuna_trial_asked_after_the_last_save_is_failed_on_resume(tmp_path):
    # Tune saved its searcher with one trial; Optuna was then asked for a second one and the
    # driver was killed. No Tune trial will ever report to that Optuna trial.
    s = _searcher(tmp_path)
    s.suggest("t1")
    s.save(str(tmp_path / "searcher-state.pkl"))
    s.suggest("t2")
    restored = _searcher(tmp_path)
    restored.restore(str(tmp_path / "searcher-state.pkl"))
    study = optuna.load_study(study_name="replay", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    t1, t2 = study.trials
    assert t1.state == optuna.trial.TrialState.RUNNING  # Tune still knows t1: it runs again
    assert t2.state == optuna.trial.TrialState.FAIL
    assert t2.user_attrs == {"regvi.orphaned_by_resume": True}
    restored.on_trial_complete("t1", {"scib_total": 0.6, "training_iteration": 3})
    assert optuna.load_study(study_name="replay", storage=s._storage).trials[0].value == 0.6
