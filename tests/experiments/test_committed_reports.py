"""Every committed ``results/*/report.md`` (and its CSV and LaTeX tables) is what ``oloraplus report``
writes from that folder's ``runs.jsonl`` and analyses today, byte for byte; likewise every
``results/tuned/*/report.md`` (and ``comparisons.csv``) and ``oloraplus report DIR --tuned``.

A change to the report code that changes a committed report must regenerate it in the same commit.
Figures are not compared (their bytes depend on the matplotlib build).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from oloraplus.cli import main

RESULTS = Path(__file__).resolve().parents[2] / "results"
pytestmark = pytest.mark.slow  # matplotlib figures for every committed grid
GRIDS = sorted(p.parent.name for p in RESULTS.glob("*/report.md"))
TABLES = ("report.md", "results.csv", "tables.tex")


@pytest.mark.parametrize("grid", GRIDS)
def test_committed_report_is_regenerated_byte_for_byte(grid, tmp_path):
    work = tmp_path / grid
    shutil.copytree(RESULTS / grid, work)
    for name in TABLES:
        (work / name).unlink(missing_ok=True)
    assert main(["report", str(work), "--output", str(work)]) == 0
    for name in TABLES:
        committed = RESULTS / grid / name
        if committed.exists():
            assert (work / name).read_bytes() == committed.read_bytes(), f"results/{grid}/{name} differs"


TUNED = sorted(p.parent.name for p in (RESULTS / "tuned").glob("*/report.md"))


@pytest.mark.parametrize("model", TUNED)
def test_committed_tuned_report_is_regenerated_byte_for_byte(model, tmp_path):
    work = tmp_path / model
    shutil.copytree(RESULTS / "tuned" / model, work)
    for name in ("report.md", "comparisons.csv"):
        (work / name).unlink(missing_ok=True)
    assert main(["report", str(work), "--tuned"]) == 0
    for name in ("report.md", "comparisons.csv"):
        assert (work / name).read_bytes() == (RESULTS / "tuned" / model / name).read_bytes(), \
            f"results/tuned/{model}/{name} differs"


def test_there_are_committed_reports():
    assert len(GRIDS) >= 4, GRIDS
