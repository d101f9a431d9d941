"""The report: statistics against hand computations, determinism, and the written files."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

from oloraplus.errors import UserError
from oloraplus.experiments.report import PAPER_TABLES, build_report, student_t_ppf, summarize

PNG = b"\x89PNG\r\n\x1a\n"

# Hand-made per-seed numbers: seeds 0, 1, 2 of each arm.
BASE = {"eval_loss": [1.0, 1.2, 1.1], "rouge1": [30.0, 31.0, 32.0], "rouge2": [10.0, 10.0, 10.0],
        "rougeL": [20.0, 22.0, 21.0], "bleu": [5.0, 6.0, 7.0]}
PLUS = {  # lambda = 1/16: eval loss consistently lower, ROUGE-1 consistently lower, others mixed
    "eval_loss": [0.9, 1.09, 0.98], "rouge1": [29.0, 29.9, 31.1], "rouge2": [10.5, 9.0, 10.1],
    "rougeL": [20.0, 22.0, 21.0], "bleu": [5.5, 6.4, 7.6]}


def row(model, method, ratio, seed, metrics, mode="generation", flags=None):
    return {"key": f"{model}/{method}-r{ratio}-s{seed}", "model": model, "method": method, "ratio": ratio,
            "seed": seed, "metrics": {**metrics, "perplexity": math.exp(metrics["eval_loss"])},
            "metrics_mode": mode, "run_dir": f"runs/{model}/{method}-r{ratio}-s{seed}",
            "flags": flags or {"n_train": 200}, "timings": {"total": 1.0}}


def synthetic_rows(model="smollm2-135m") -> list[dict]:
    rows = []
    for seed in range(3):
        rows.append(row(model, "olora", 1.0, seed, {k: v[seed] for k, v in BASE.items()}))
        rows.append(row(model, "olora-plus", 0.0625, seed, {k: v[seed] for k, v in PLUS.items()}))
    return rows


def write_runs(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sample_std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ----------------------------------------------------------------------------- Student t


def test_t_quantiles_match_tables_and_closed_forms():
    assert student_t_ppf(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert student_t_ppf(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert student_t_ppf(0.975, 30) == pytest.approx(2.042272, abs=1e-6)
    for p in (0.6, 0.9, 0.975, 0.995):
        assert student_t_ppf(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
        assert student_t_ppf(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
        assert student_t_ppf(1 - p, 7) == pytest.approx(-student_t_ppf(p, 7), rel=1e-9)


def test_summary_means_stds_and_paired_intervals_match_hand_computation():
    summary = summarize(synthetic_rows())
    base, plus = summary.stats["smollm2-135m"]
    assert base.arm.is_baseline and plus.arm.ratio == 0.0625 and base.n == plus.n == 3
    for metric, values in BASE.items():
        assert base.mean(metric) == pytest.approx(sum(values) / 3)
        assert base.std(metric) == pytest.approx(sample_std(values))
    diffs = {d.metric: d for d in summary.paired["smollm2-135m"]}
    t = 4.302653  # t_{0.975, df=2}
    for metric in BASE:
        d = [p - b for p, b in zip(PLUS[metric], BASE[metric])]
        mean, half = sum(d) / 3, t * sample_std(d) / math.sqrt(3)
        assert diffs[metric].mean == pytest.approx(mean)
        lo, hi = diffs[metric].interval
        assert lo == pytest.approx(mean - half, rel=1e-6) and hi == pytest.approx(mean + half, rel=1e-6)
    # eval loss diffs -0.1, -0.11, -0.12: CI entirely below 0 -> better (lower loss)
    assert diffs["eval_loss"].verdict == "better"
    # ROUGE-1 diffs -1, -1.1, -0.9: CI entirely below 0 -> worse
    assert diffs["rouge1"].verdict == "worse"
    # ROUGE-2 diffs +0.5, -1, +0.1: CI holds 0
    assert diffs["rouge2"].verdict == "within noise"
    # ROUGE-L identical: zero-width interval at 0 is not a difference
    assert diffs["rougeL"].verdict == "within noise"
    # BLEU diffs +0.5, +0.4, +0.6: better
    assert diffs["bleu"].verdict == "better"


def test_pairing_uses_only_common_seeds_and_single_seed_has_no_interval():
    rows = synthetic_rows()
    rows = [r for r in rows if not (r["method"] == "olora" and r["seed"] == 2)]
    diffs = {d.metric: d for d in summarize(rows).paired["smollm2-135m"]}
    assert diffs["bleu"].seeds == [0, 1] and diffs["bleu"].diffs == pytest.approx([0.5, 0.4])
    single = summarize([r for r in synthetic_rows() if r["seed"] == 0])
    d = single.paired["smollm2-135m"][0]
    assert d.interval is None and d.verdict.startswith("n/a")
    assert single.stats["smollm2-135m"][0].std("bleu") is None


# ----------------------------------------------------------------------------- files


def test_report_markdown_shows_tables_paper_numbers_and_verdicts(tmp_path):
    files = build_report(write_runs(tmp_path / "runs.jsonl", synthetic_rows()), tmp_path)
    md = files.markdown.read_text()
    # baseline eval loss 1.1000 ± 0.1000 (hand: mean 1.1, sd 0.1); OLoRA+ is lower, so it is bold
    assert "| OLoRA baseline | 3 | 1.1000 ± 0.1000 |" in md
    plus_mean, plus_sd = sum(PLUS["eval_loss"]) / 3, sample_std(PLUS["eval_loss"])
    assert f"| OLoRA+ λ=1/16 | 3 | **{plus_mean:.4f} ± {plus_sd:.4f}** |" in md
    assert "λ (lr_B / lr_A) of the OLoRA+ rows: 1/16 (= 0.0625)" in md
    assert "metrics mode: generation" in md
    d = [p - b for p, b in zip(PLUS["eval_loss"], BASE["eval_loss"])]
    half = 4.302653 * sample_std(d) / math.sqrt(3)
    mean = sum(d) / 3
    assert (f"| OLoRA+ λ=1/16 − baseline | Eval Loss | 3 | {mean:+.4f} | "
            f"[{mean - half:+.4f}, {mean + half:+.4f}] | better |") in md
    # the paper's printed tables are shown, with Table 4
    for _, (table, name, values) in PAPER_TABLES.items():
        assert f"Paper's {table}, {name}" in md and f"{values[0][0]:.2f}" in md
    assert "Paper's Table 4" in md and "our Table 4" in md


def test_paper_table_sits_next_to_the_matching_model(tmp_path):
    rows = synthetic_rows("tinyllama-1.1b") + synthetic_rows("smollm2-135m")
    md = build_report(write_runs(tmp_path / "runs.jsonl", rows), tmp_path).markdown.read_text()
    ours = md.index("## tinyllama-1.1b")
    assert ours < md.index("Paper's Table 1, TinyLlama-1.1B") < md.index("## smollm2-135m")
    assert md.count("Paper's Table 1,") == 1  # not repeated among "the paper's other tables"


@pytest.mark.slow
def test_report_is_deterministic(tmp_path):
    rows = synthetic_rows("tinyllama-1.1b") + synthetic_rows()
    first = build_report(write_runs(tmp_path / "a" / "runs.jsonl", rows), tmp_path / "a")
    again = build_report(tmp_path / "a" / "runs.jsonl", tmp_path / "a")
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    other = build_report(write_runs(tmp_path / "b" / "runs.jsonl", shuffled), tmp_path / "b")
    text = first.markdown.read_bytes()
    assert again.markdown.read_bytes() == text == other.markdown.read_bytes()
    assert first.csv.read_bytes() == other.csv.read_bytes()
    assert first.latex.read_bytes() == other.latex.read_bytes()


def test_csv_and_latex(tmp_path):
    rows = synthetic_rows() + [row("my_model", "olora", 1.0, 0, {k: v[0] for k, v in BASE.items()})]
    files = build_report(write_runs(tmp_path / "runs.jsonl", rows), tmp_path)
    table = list(csv.DictReader(files.csv.open()))
    assert len(table) == 3
    plus = next(r for r in table if r["model"] == "smollm2-135m" and r["method"] == "olora-plus")
    assert float(plus["ratio"]) == 0.0625 and plus["n"] == "3" and plus["seeds"] == "0 1 2"
    assert float(plus["bleu_mean"]) == pytest.approx(sum(PLUS["bleu"]) / 3)
    assert float(plus["bleu_std"]) == pytest.approx(sample_std(PLUS["bleu"]))
    single = next(r for r in table if r["model"] == "my_model")
    assert single["n"] == "1" and single["bleu_std"] == ""
    tex = files.latex.read_text()
    assert tex.count(r"\begin{tabular}") == 3  # two models + best-per-model
    assert r"my\_model" in tex and r"$\lambda=\frac{1}{16}$" in tex and r"\textbf{" in tex


@pytest.mark.slow
def test_figures_written_and_ratio_figure_only_for_more_than_two_ratios(tmp_path):
    two = [r for r in synthetic_rows()]  # baseline + one ratio
    files = build_report(write_runs(tmp_path / "runs.jsonl", two), tmp_path)
    assert files.figure_metrics.read_bytes()[:8] == PNG and files.figure_metrics.stat().st_size > 10_000
    assert files.figure_ratio is None and not (tmp_path / "figure_ratio.png").exists()

    three = two + [row("smollm2-135m", "olora-plus", 16.0, s, {k: v[s] + 0.3 for k, v in BASE.items()})
                   for s in range(3)]
    files = build_report(write_runs(tmp_path / "runs.jsonl", three), tmp_path)
    assert files.figure_ratio.read_bytes()[:8] == PNG and files.figure_ratio.stat().st_size > 10_000
    assert "figure_ratio.png" in files.markdown.read_text()

    files = build_report(write_runs(tmp_path / "runs.jsonl", two), tmp_path)  # stale figure removed
    assert not (tmp_path / "figure_ratio.png").exists()


def test_mixed_metric_modes_are_flagged(tmp_path):
    rows = synthetic_rows()
    rows[1]["metrics_mode"] = "teacher-forced"
    md = build_report(write_runs(tmp_path / "runs.jsonl", rows), tmp_path).markdown.read_text()
    assert "MIXED (generation, teacher-forced)" in md


def test_report_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_report(tmp_path / "missing.jsonl", tmp_path)
    (tmp_path / "runs.jsonl").write_text("")
    with pytest.raises(UserError, match="no finished runs"):
        build_report(tmp_path, tmp_path)
    (tmp_path / "runs.jsonl").write_text('{"key": "a"}\n')
    with pytest.raises(UserError, match="no 'model'"):
        build_report(tmp_path, tmp_path)
    (tmp_path / "runs.jsonl").write_text('{"key": \n')
    with pytest.raises(UserError, match="line 1"):
        build_report(tmp_path, tmp_path)
