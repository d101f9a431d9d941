"""The report's regime section: analysis aggregates per arm over seeds, dynamics and drift figures."""

from __future__ import annotations

import json
import math
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
START_TOP = 0.25  # step-0 top-r share: a property of the base model, the same in every run


def aggregate(ratio: float, seed: int, baseline: float = 0.92) -> dict:
    # MLP layers 3 times wider than attention ones: twice the raw drift, 2/3 of it per dimension.
    return {
        "b_subspace_drift": DRIFT[ratio][seed], "b_subspace_drift_random_baseline": baseline,
        "b_subspace_drift_vs_random": DRIFT[ratio][seed] / baseline,
        "b_rel_change": B_REL[ratio][seed], "a_rel_change": 0.01, "b_orthonormality_error": 0.1,
        "update_effective_rank": 30.0 + seed, "update_in_top_subspace": None, "start_in_top_subspace": START_TOP,
        "by_layer_type": {"attention": {"b_subspace_drift": ATTN[ratio][seed],
                                        "b_subspace_drift_per_dim": ATTN[ratio][seed] / 500},
                          "mlp": {"b_subspace_drift": 2 * ATTN[ratio][seed],
                                  "b_subspace_drift_per_dim": 2 * ATTN[ratio][seed] / 1500}},
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
        seeds, drift, vs_random, attn, mlp, attn_dim, mlp_dim, b_rel, *_, start_top, top = table[label]
        assert seeds == "3"
        assert drift == f"{statistics.fmean(DRIFT[ratio]):.3g} ± {statistics.stdev(DRIFT[ratio]):.2g}"
        relative = [x / 0.92 for x in DRIFT[ratio]]
        assert vs_random == f"{statistics.fmean(relative):.3g} ± {statistics.stdev(relative):.2g}"
        assert attn == f"{statistics.fmean(ATTN[ratio]):.3g} ± {statistics.stdev(ATTN[ratio]):.2g}"
        doubled = [2 * x for x in ATTN[ratio]]
        assert mlp == f"{statistics.fmean(doubled):.3g} ± {statistics.stdev(doubled):.2g}"
        assert attn_dim.startswith(f"{statistics.fmean(ATTN[ratio]) / 500:.3g}")
        assert mlp_dim.startswith(f"{statistics.fmean(doubled) / 1500:.3g}")
        assert b_rel == f"{statistics.fmean(B_REL[ratio]):.3g} ± {statistics.stdev(B_REL[ratio]):.2g}"
        assert start_top == "0.25 ± 0"  # the same in every seed
        assert top == "-"  # no value in any seed
    section = files.markdown.read_text().split("## Regimes", 1)[1]
    header = next(ln for ln in section.splitlines() if ln.startswith("| Method"))
    assert "| drift per dim (attn) | drift per dim (MLP) |" in header
    assert "| top-r share, step 0 | update in top-r of W |" in header
    assert "Random-subspace drift baseline of smollm2-135m: 0.920" in files.markdown.read_text()
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


@pytest.mark.slow
def test_two_seeds_give_a_t_interval_and_each_model_its_own_baseline(tmp_path):
    from scipy.stats import t

    rows = rows_with_exploration()
    rows += [{**r, "model": "gemma3-270m", "key": "g" + r["key"]} for r in rows]
    write_runs(tmp_path / "runs.jsonl", rows)
    path = write_analysis(tmp_path / "analysis" / "analysis.json", rows, seeds=(0, 1))
    data = json.loads(path.read_text())
    for e in data["runs"]:
        if e["model"] == "gemma3-270m":
            e["aggregate"] = aggregate(e["ratio"], e["seed"], baseline=0.94)
    path.write_text(json.dumps(data))
    text = build_report(tmp_path, tmp_path).markdown.read_text()
    assert "Random-subspace drift baseline of smollm2-135m: 0.920" in text
    assert "Random-subspace drift baseline of gemma3-270m: 0.940" in text
    two = DRIFT[16.0][:2]
    half = t.ppf(0.975, 1) * statistics.stdev(two) / math.sqrt(2)
    expected = f"{statistics.fmean(two):.3g} [{statistics.fmean(two) - half:.3g}, {statistics.fmean(two) + half:.3g}]"
    seeds, drift = regime_table(text)["OLoRA+ λ=16"][:2]
    assert (seeds, drift) == ("2", expected)


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
