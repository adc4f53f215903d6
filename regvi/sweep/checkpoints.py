"""The layout of a trial's Ray Train checkpoints: written, read and restored only here.

A checkpoint folder holds::

    model/               the model (RegVI.save) with its history up to this epoch
    <optimizer state>    Adam's moments (regvi.io.save_optimizer_state), per-epoch checkpoints
    trial_state.json     {"training_done", "early_stopping", "final" (the final report)}
    eval_latent.npy      final checkpoint: latent of the evaluation subsample
    eval_indices.npy     final checkpoint: the subsample's cell indices
    plots/               final checkpoint: evaluation tables and figures

Every epoch :class:`regvi.sweep.reporting.RayEpochReporter` writes one (:func:`write_epoch`);
after training the trial's rank 0 writes the final one (:func:`write_final`) with the
evaluation's outputs. A restarted worker continues from the latest (:func:`restore`), or reports
a finished trial's final result again (:func:`final_result`). The MLflow callback logs
``model/``, ``plots/`` and the two ``.npy`` files of the final checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_DIR = "model"
STATE_FILE = "trial_state.json"
LATENT_FILE = "eval_latent.npy"
EVAL_INDEX_FILE = "eval_indices.npy"
PLOTS_DIR = "plots"


def _write_state(directory: Path, state: dict[str, Any]) -> None:
    (Path(directory) / STATE_FILE).write_text(json.dumps(state))


def read_state(directory: str | Path) -> dict[str, Any]:
    """``trial_state.json`` of a checkpoint."""
    return json.loads((Path(directory) / STATE_FILE).read_text())


def write_epoch(
    directory: str | Path,
    model: Any,
    history: Any,
    optimizer_state: dict[str, Any] | None,
    early_stopping: dict[str, Any] | None,
) -> None:
    """An epoch's checkpoint: ``model`` saved with ``history`` (its epochs so far; the model's
    own history is left as it was), Adam's state (so a restart resumes exactly) and the early
    stopping state."""
    from regvi.io import save_optimizer_state

    directory = Path(directory)
    prior = model.history
    model.history = history
    try:
        model.save(directory / MODEL_DIR, overwrite=True)
    finally:
        model.history = prior
    if optimizer_state is not None:
        save_optimizer_state(optimizer_state, directory)
    _write_state(directory, {"training_done": False, "early_stopping": early_stopping})


def write_final(directory: str | Path, model: Any, final: dict[str, Any]) -> None:
    """The final checkpoint's model and state (``final``: the trial's final report)."""
    directory = Path(directory)
    model.save(directory / MODEL_DIR, overwrite=True)
    _write_state(directory, {"training_done": True, "early_stopping": None, "final": final})


def write_evaluation_subsample(directory: str | Path, latent: Any, indices: Any) -> None:
    """The evaluation subsample's latent and cell indices."""
    import numpy as np

    np.save(Path(directory) / LATENT_FILE, latent, allow_pickle=False)
    np.save(Path(directory) / EVAL_INDEX_FILE, indices, allow_pickle=False)


def plots_dir(directory: str | Path) -> Path:
    """Where the evaluation's tables and figures go (not created)."""
    return Path(directory) / PLOTS_DIR


def restore(directory: str | Path, model: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load a checkpoint's weights and history into ``model``; returns the checkpoint's state
    and the optimizer state (``None`` if it has none)."""
    import regvi
    from regvi.io import load_optimizer_state

    directory = Path(directory)
    restored = regvi.load(directory / MODEL_DIR)
    model.module.load_state_dict(restored.module.state_dict())
    model.history = restored.history
    return read_state(directory), load_optimizer_state(directory)


def final_result(directory: str | Path) -> dict[str, Any] | None:
    """The final report stored in a finished trial's checkpoint; ``None`` for an unfinished
    trial's."""
    state = read_state(directory)
    final = state.get("final")
    if not state.get("training_done") or final is None:
        return None
    return final
