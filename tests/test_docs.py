"""The documentation site (docs/, Sphinx + MyST) builds with warnings as errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_docs_build_without_warnings(tmp_path):
    out = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, (
        f"sphinx failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    )
    for page in ("index.html", "model.html", "api.html"):
        assert (out / page).is_file(), f"{page} was not built"
    assert "RegVI" in (out / "api.html").read_text(encoding="utf-8")
