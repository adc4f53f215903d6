"""Search space: config parameters → Optuna define-by-run function, or an explicit grid."""

from __future__ import annotations

import itertools
from typing import Any

from regvi.sweep.config import Param, SweepConfig


def _active(p: Param, chosen: dict[str, Any]) -> bool:
    """A conditional parameter is sampled only when every ``when`` condition holds."""
    return all(chosen.get(k) == v for k, v in p.when.items())


def _ordered(params: list[Param]) -> list[Param]:
    """Parameters with their conditions' parents first."""
    done: list[Param] = []
    pending = list(params)
    while pending:
        ready = [p for p in pending if all(d in {q.name for q in done} for d in p.when)]
        if not ready:
            raise ValueError(f"cyclic 'when' conditions among {[p.name for p in pending]}")
        done.extend(ready)
        pending = [p for p in pending if p not in ready]
    return done


class DefineByRun:
    """Optuna define-by-run space (picklable, so Tune can checkpoint the searcher).

    Suggested values land under ``params/<name>``; conditional parameters are only suggested
    when their ``when`` conditions hold.
    """

    def __init__(self, params: list[Param]):
        self.params = _ordered(params)

    def __call__(self, trial: Any) -> None:
        chosen: dict[str, Any] = {}
        for p in self.params:
            if not _active(p, chosen):
                continue
            name = f"params/{p.name}"
            if p.type == "categorical":
                chosen[p.name] = trial.suggest_categorical(name, p.values)
            elif p.type == "int":
                chosen[p.name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
            else:
                chosen[p.name] = trial.suggest_float(name, float(p.low), float(p.high), log=p.log)


def define_by_run(cfg: SweepConfig) -> DefineByRun:
    """The config's search space as an Optuna define-by-run callable."""
    return DefineByRun(cfg.params)


def grid(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every combination of categorical values, conditional parameters dropped where inactive."""
    params = _ordered(cfg.params)
    points = []
    for combo in itertools.product(*[p.values for p in params]):
        chosen: dict[str, Any] = {}
        for p, v in zip(params, combo, strict=True):
            if _active(p, chosen):
                chosen[p.name] = v
        if chosen not in points:
            points.append(chosen)
    return points


def describe(cfg: SweepConfig) -> str:
    """Human-readable search space (for ``--dry-run``)."""
    lines = []
    for p in _ordered(cfg.params):
        if p.type == "categorical":
            dom = f"one of {p.values}"
        else:
            dom = f"{p.type} [{p.low}, {p.high}]" + (
                " (log)" if p.log and p.type != "loguniform" else ""
            )
        cond = f"  when {p.when}" if p.when else ""
        width = max([28, *(len(q.name) + 1 for q in cfg.params)])
        lines.append(f"  {p.name:<{width}} {p.target:<9} {dom}{cond}")
    return "\n".join(lines)
