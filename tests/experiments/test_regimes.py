"""The report's regime section: analysis aggregates per arm over seeds, dynamics and drift figures."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from test_report import PNG, synthetic_rows, write_runs

from oloraplus.cli import main
from oloraplus.errors import UserError
from oloraplus.experiments.report import build_report

# Hand-made aggregates per (ratio, seed): B drift and relative change of B, attention / MLP drift.
DRIFT = {1.0: [0.003, 0.004, 0.002], 0.0625: [2e-5, 3e-5, 1e-5], 16.0: [0.30, 0.32, 0.31]}
B_REL = {1.0: [0.05, 0.06, 0.04], 0.0625: [0.004, 0.005, 0.003], 16.0: [0.8, 0.9, 0.85]}
ATTN = {1.0: [0.001, 0.002, 0.0015], 0.0625: [1e-5, 1e-5, 1e-5], 16.0: [0.2, 0.21, 0.19]}


def aggregate(ratio: float, seed: int) -> dict:
    return {
        "b_subspace_drift": DRIFT[ratio][seed], "b_subspace_drift_random_baseline": 0.92,
        "b_rel_change": B_REL[ratio][seed], "a_rel_change": 0.01, "b_orthonormality_error": 0.1,
        "update_effective_rank": 30.0 + seed, "update_in_top_subspace": None,
        "by_layer_type": {"attention": {"b_subspace_drift": ATTN[ratio][seed]},
                          "mlp": {"b_subspace_drift": 2 * ATTN[ratio][seed]}},
    }


def rows_with_exploration() -> list[dict]:
    from test_report import BASE, row

    rows = synthetic_rows()
    rows += [row("smollm2-135m", "olora-plus", 16.0, s, {k: v[s] for k, v in BASE.items()}) for s in range(3)]
    return rows


def write_analysis(path: Path, rows: list[dict], seeds=(0, 1, 2)) -> Path:
    entries = [
        {"run": f"elsewhere/{r['key']}", "model": r["model"], "method": r["method"], "ratio": r["ratio"],
         "seed": r["seed"], "init": "olora", "aggregate": aggregate(r["ratio"], r["seed"]), "layers": {}}
        for r in rows if r["seed"] in seeds
    ]
    # An analysed run that is not in runs.jsonl is ignored.
    entries.append({**entries[0], "model": "other-model", "aggregate": aggregate(1.0, 0)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": entries, "plots": []}))
    return path


def regime_table(markdown: str) -> dict[str, list[str]]:
    section = markdown.split("## Regimes", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| Method")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)}


@pytest.mark.slow
def test_regime_table_is_mean_and_std_over_seeds(tmp_path):
    rows = rows_with_exploration()
    write_runs(tmp_path / "runs.jsonl", rows)
    write_analysis(tmp_path / "analysis" / "analysis.json", rows)  # the default location
    files = build_report(tmp_path, tmp_path)
    table = regime_table(files.markdown.read_text())
    assert list(table) == ["OLoRA baseline", "OLoRA+ λ=1/16", "OLoRA+ λ=16"]
    for label, ratio in (("OLoRA baseline", 1.0), ("OLoRA+ λ=1/16", 0.0625), ("OLoRA+ λ=16", 16.0)):
        seeds, drift, attn, mlp, b_rel, *_, top = table[label]
        assert seeds == "3"
        assert drift == f"{statistics.fmean(DRIFT[ratio]):.3g} ± {statistics.stdev(DRIFT[ratio]):.2g}"
        assert attn == f"{statistics.fmean(ATTN[ratio]):.3g} ± {statistics.stdev(ATTN[ratio]):.2g}"
        doubled = [2 * x for x in ATTN[ratio]]
        assert mlp == f"{statistics.fmean(doubled):.3g} ± {statistics.stdev(doubled):.2g}"
        assert b_rel == f"{statistics.fmean(B_REL[ratio]):.3g} ± {statistics.stdev(B_REL[ratio]):.2g}"
        assert top == "-"  # no value in any seed
    assert "about 0.92 for a random subspace" in files.markdown.read_text()
    assert files.figure_drift_ratio.read_bytes().startswith(PNG)  # three ratios
    assert files.figure_dynamics is None  # no run folder has dynamics.jsonl


@pytest.mark.slow
def test_analysis_in_parts_is_found_by_default_and_equals_one_file(tmp_path):
    rows = rows_with_exploration()
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for folder in (whole, parts):
        write_runs(folder / "runs.jsonl", rows)
    write_analysis(whole / "analysis" / "analysis.json", rows)
    write_analysis(parts / "analysis" / "seed0" / "analysis.json", rows, seeds=(0,))
    write_analysis(parts / "analysis" / "seed12" / "analysis.json", rows, seeds=(1, 2))
    expected = regime_table(build_report(whole, whole).markdown.read_text())
    assert expected and regime_table(build_report(parts, parts).markdown.read_text()) == expected


def test_single_seed_has_no_spread_and_two_ratios_give_no_drift_figure(tmp_path):
    rows = synthetic_rows()  # ratios 1 and 1/16 only
    write_runs(tmp_path / "runs.jsonl", rows)
    analysis = write_analysis(tmp_path / "elsewhere.json", rows, seeds=(1,))
    (tmp_path / "figure_drift_ratio.png").write_bytes(PNG)  # stale, from a larger grid
    files = build_report(tmp_path, tmp_path, analyses=[analysis])
    table = regime_table(files.markdown.read_text())
    assert table["OLoRA baseline"][:2] == ["1", f"{DRIFT[1.0][1]:.3g}"]
    assert files.figure_drift_ratio is None and not (tmp_path / "figure_drift_ratio.png").exists()


def test_dynamics_files_give_the_curves_figure(tmp_path):
    rows = synthetic_rows()
    write_runs(tmp_path / "runs.jsonl", rows)
    run = tmp_path / rows[0]["run_dir"]
    run.mkdir(parents=True)
    lines = [json.dumps({"step": s, "b_subspace_drift": 1e-4 * s, "b_rel_change": 1e-3 * s}) for s in (0, 5, 10)]
    (run / "dynamics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 15, \"b_subsp")  # torn last line
    files = build_report(tmp_path, tmp_path)
    assert files.figure_dynamics.read_bytes().startswith(PNG)
    assert "![figure_dynamics.png](figure_dynamics.png)" in files.markdown.read_text()


@pytest.mark.slow
def test_last_dynamics_row_stands_in_for_a_missing_analysis(tmp_path):
    from oloraplus.experiments.arms import Arm

    rows = rows_with_exploration()
    write_runs(tmp_path / "runs.jsonl", rows)
    run = tmp_path / rows[0]["run_dir"]
    run.mkdir(parents=True)
    last = {**aggregate(rows[0]["ratio"], 1), "step": 10, "b_subspace_drift": 0.0123}
    lines = [json.dumps({"step": 0, "b_subspace_drift": 0.0, "b_rel_change": 0.0}), json.dumps(last)]
    (run / "dynamics.jsonl").write_text("\n".join(lines) + "\n")
    label = Arm.of(rows[0]["method"], rows[0]["ratio"]).label
    text = build_report(tmp_path, tmp_path / "a").markdown.read_text()
    table = regime_table(text)
    assert list(table) == [label]  # only the run with a dynamics file has regime data
    assert table[label][:2] == ["1", "0.0123"]
    assert "1 run(s) have no `analyze` entry" in text
    write_analysis(tmp_path / "analysis" / "analysis.json", rows)  # an analysis entry wins
    text = build_report(tmp_path, tmp_path / "b").markdown.read_text()
    drifts = DRIFT[rows[0]["ratio"]]
    assert regime_table(text)[label][:2] == ["3", f"{statistics.fmean(drifts):.3g} ± {statistics.stdev(drifts):.2g}"]
    assert "have no `analyze` entry" not in text


@pytest.mark.slow
def test_no_analysis_no_dynamics_no_section_and_report_is_deterministic(tmp_path):
    rows = rows_with_exploration()
    write_runs(tmp_path / "runs.jsonl", rows)
    assert "## Regimes" not in build_report(tmp_path, tmp_path / "a").markdown.read_text()
    write_analysis(tmp_path / "analysis" / "analysis.json", rows)
    first = build_report(tmp_path, tmp_path / "b").markdown.read_bytes()
    assert b"## Regimes" in first
    assert build_report(tmp_path, tmp_path / "c").markdown.read_bytes() == first


def test_bad_analysis_files_are_one_line_errors(tmp_path, capsys):
    write_runs(tmp_path / "runs.jsonl", synthetic_rows())
    with pytest.raises(UserError, match="not found"):
        build_report(tmp_path, tmp_path, analyses=[tmp_path / "missing.json"])
    (tmp_path / "bad.json").write_text("{\"not\": 1}")
    with pytest.raises(UserError, match="not an analysis.json"):
        build_report(tmp_path, tmp_path, analyses=[tmp_path / "bad.json"])
    assert main(["report", str(tmp_path), "--analysis", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not an analysis.json" in err[0]
    assert not (tmp_path / "report.md").exists()  # nothing half-written
