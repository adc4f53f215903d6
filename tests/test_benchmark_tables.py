"""benchmarks/_common.py: the text-table column specs every benchmark prints its tables with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common


def test_columns_written_as_a_text_table_render_like_tuples():
    spec = _common.parse_columns(
        """
        median s/epoch: regvi  21.2f  regvi_median_epoch_s
        batch                  >5     batch_size
        """
    )
    assert spec == [
        ("median s/epoch: regvi", "21.2f", "regvi_median_epoch_s"),
        ("batch", ">5", "batch_size"),
    ]
    rows = [{"regvi_median_epoch_s": 1.5, "batch_size": 128}, {"batch_size": 1024}]
    lines = _common.render_table(rows, spec).splitlines()
    assert lines[0] == "median s/epoch: regvi batch"
    assert lines[2].split() == ["1.50", "128"]
    assert lines[3].split() == ["-", "1024"]  # a missing value prints as '-'


def test_a_column_line_without_three_fields_names_the_line():
    with pytest.raises(ValueError, match=r"column 'ratio 6.2f': expected 'title  format  key'"):
        _common.parse_columns("ratio 6.2f")
