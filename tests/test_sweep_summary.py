"""regvi.sweep.summary: the Pareto front and the Bio score its plot uses."""

from __future__ import annotations

import numpy as np
import pandas as pd

from regvi.sweep.summary import bio_column, pareto_front, plot_pareto


def test_pareto_front_keeps_exactly_the_non_dominated_trials():
    pts = np.array([[0.5, 0.9], [0.7, 0.7], [0.6, 0.6], [0.7, 0.7], [0.4, 0.8]])
    # (0.6, 0.6) is dominated by (0.7, 0.7); (0.4, 0.8) by (0.5, 0.9); ties stay on the front
    assert pareto_front(pts).tolist() == [True, True, False, True, False]


def test_pareto_plot_uses_the_start_averaged_bio_where_trials_logged_it(tmp_path):
    table = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c"],
            "scib_batch": [0.5, 0.7, 0.6],
            "scib_bio": [0.9, 0.8, 0.7],
            "scib_bio_stable": [0.80, 0.79, np.nan],  # c: an old trial without it
        }
    )
    assert bio_column(table) == "scib_bio_stable"
    assert bio_column(table.drop(columns="scib_bio_stable")) == "scib_bio"
    assert bio_column(table.assign(scib_bio_stable=np.nan)) == "scib_bio"
    png = plot_pareto(table, tmp_path / "pareto.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_pareto(table.drop(columns="scib_batch"), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
