"""The sweep's experiment is tagged as model training, so the MLflow UI treats it as such."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from regvi.sweep.tracking import KIND_TRAINING, TAG_KIND, ensure_experiment


def test_a_new_experiment_is_tagged_as_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = ensure_experiment(uri, "sweep", tmp_path / "artifacts")
    exp = MlflowClient(tracking_uri=uri).get_experiment(exp_id)
    assert TAG_KIND == "mlflow.experimentKind"
    assert exp.tags[TAG_KIND] == KIND_TRAINING == "custom_model_development"
    assert ensure_experiment(uri, "sweep") == exp_id  # found again, not created twice


def test_an_existing_experiment_gets_the_tag_but_a_users_value_is_kept(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    untagged = c.create_experiment("untagged")
    own = c.create_experiment("own", tags={TAG_KIND: "genai_development"})
    assert ensure_experiment(uri, "untagged") == untagged
    assert ensure_experiment(uri, "own") == own
    assert c.get_experiment(untagged).tags[TAG_KIND] == KIND_TRAINING
    assert c.get_experiment(own).tags[TAG_KIND] == "genai_development"


def test_a_failed_model_upload_leaves_the_trial_run_unfinished(tmp_path):
    """A model upload that fails (e.g. on a full disk) must not mark the trial's run FAILED:
    the sweep stops and --resume logs the trial again."""
    from regvi.sweep.tracking import client, log_model_dir

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "upload", artifact_root=tmp_path / "artifacts")
    c = client(uri)
    run_id = c.create_run(exp).info.run_id
    with pytest.raises(MlflowException):
        log_model_dir(uri, run_id, tmp_path / "no-such-model")
    assert c.get_run(run_id).info.status == "RUNNING"
