"""The reproduction report, built from ``runs.jsonl`` alone.

Writes ``report.md`` (the paper's Tables 1-4 layout with mean ± std over seeds, next to the
paper's printed numbers, plus paired OLoRA+ - OLoRA differences with 95% t intervals),
``results.csv``, ``tables.tex``, ``figure_metrics.png`` (the paper's Figure 3) and, when a model
was run at more than two ratios, ``figure_ratio.png`` (each metric against log2 lambda).

Why paired differences: the paper reports gaps of 0.01-0.3 points without any spread. In these
grids a seed changes the batch order only: OLoRA's start is a deterministic function of the base
weights (PEFT's default LoRA init does draw A at random from the seed), and the data split and the
eval set are fixed by ``data_seed``, which a grid shares across seeds. So the baseline and OLoRA+
runs of one seed are paired, and the seed-to-seed variation of their difference says whether a gap
is larger than batch-order noise; it says nothing about another split or eval set. No correction
for the number of tests is applied here (results/tuned/ uses Holm).

The report is deterministic: the same ``runs.jsonl`` gives a byte-identical ``report.md``
(no timestamps; models, arms and seeds are sorted). Nothing here imports torch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from oloraplus.errors import UserError
from oloraplus.experiments.arms import Arm, family_title, method_family, ratio_text
from oloraplus.experiments.render import md_table, save_png
from oloraplus.files import write_text_atomic

# (key, column title, lower is better, decimals) in the paper's column order.
METRICS: tuple[tuple[str, str, bool, int], ...] = (
    ("eval_loss", "Eval Loss", True, 4),
    ("rouge1", "ROUGE-1", False, 2),
    ("rouge2", "ROUGE-2", False, 2),
    ("rougeL", "ROUGE-L", False, 2),
    ("bleu", "BLEU", False, 2),
)

METRIC_KEYS = tuple(m[0] for m in METRICS)

TITLES = {m[0]: m[1] for m in METRICS}

LOWER_IS_BETTER = {m[0]: m[2] for m in METRICS}

DECIMALS = {m[0]: m[3] for m in METRICS}

FIGURE_METRICS = ("eval_loss", "bleu", "rouge1", "rouge2", "rougeL")  # the paper's Figure 3 panels a-e

CONFIDENCE = 0.95

# The paper's printed numbers (Kushmuratov et al., "OLoRA+"), Tables 1-4; no spread reported.
PAPER_ROWS = ("OLoRA (baseline)", "OLoRA+ (λ << 1)", "OLoRA+ (λ >> 1)")

PAPER_TABLES: dict[str, tuple[str, str, tuple[tuple[float, ...], ...]]] = {
    # registry name: (table, model as printed, rows of (eval loss, ROUGE-1, ROUGE-2, ROUGE-L, BLEU))
    "tinyllama-1.1b": ("Table 1", "TinyLlama-1.1B", (
        (88.49, 74.53, 56.46, 71.78, 56.81), (88.22, 74.56, 56.41, 71.86, 56.83), (88.39, 74.52, 56.49, 71.86, 56.83))),
    "opt-1.3b": ("Table 2", "OPT-1.3B", (
        (75.72, 63.53, 62.32, 73.08, 68.45), (75.68, 62.56, 62.38, 73.13, 68.56), (75.41, 64.52, 62.33, 73.25, 68.53))),
    "gemma-2b": ("Table 3", "Gemma-2B", (
        (81.22, 83.78, 59.25, 78.56, 62.14), (81.18, 83.82, 59.36, 78.59, 62.19), (81.13, 83.81, 59.33, 78.61, 62.19))),
}

PAPER_TABLE4: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("TinyLlama", (88.22, 74.56, 56.49, 71.86, 56.83)),
    ("OPT-1.3B", (75.41, 64.52, 62.38, 73.25, 68.56)),
    ("Gemma-2B", (81.13, 83.82, 59.36, 78.61, 62.19)),
)

_PAPER_ALIASES = {"tinyllama/tinyllama_v1.1": "tinyllama-1.1b", "facebook/opt-1.3b": "opt-1.3b",
                  "google/gemma-2b": "gemma-2b"}

PAPER_NOTE = (
    "The paper's eval loss (75-88) is not a cross-entropy in nats and its unit is not stated, so only "
    "the ordering of its rows is comparable with ours; it gives no seeds, spread, or exact λ values."
)


def student_t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t distribution (scipy), for the paired confidence intervals."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def read_runs(path: str | Path) -> list[dict]:
    """Rows of a ``runs.jsonl`` file (empty list if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            raise UserError(f"{path}: line {n} is nested too deeply to be a run; fix or delete that line") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {n} is not valid JSON ({exc.msg}); fix or delete that line") from exc
        problem = _run_row_problem(row)
        if problem:
            raise UserError(f"{path}: line {n} {problem}; fix or delete that line")
        rows.append(row)
    return rows


# What every runs.jsonl line holds (see experiments.grid.run_row); the report reads these.
RUN_ROW_FIELDS = ("key", "model", "method", "ratio", "seed", "metrics")


_RUN_ROW_TYPES = {"key": str, "model": str, "method": str, "ratio": (int, float), "seed": int, "metrics": dict}


def _run_row_problem(row) -> str | None:
    """Why a parsed runs.jsonl line is not a run row (None if it is one)."""
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not a run (an object written by 'oloraplus sweep')"
    for name in RUN_ROW_FIELDS:
        if name not in row:
            return f"has no '{name}'; is this a runs.jsonl written by 'oloraplus sweep'?"
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, _RUN_ROW_TYPES[name]):
            return f"is not a run: its '{name}' is a {type(value).__name__}"
    return None


@dataclass
class ArmStats:
    """One model x arm over its seeds."""

    model: str
    arm: Arm
    seeds: list[int]
    values: dict[str, list[float]]  # metric -> one value per seed, in ``seeds`` order
    modes: list[str]

    @property
    def n(self) -> int:
        return len(self.seeds)

    def mean(self, metric: str) -> float:
        return statistics.fmean(self.values[metric])

    def std(self, metric: str) -> float | None:
        """Sample standard deviation (ddof=1); None for a single seed."""
        vals = self.values[metric]
        return statistics.stdev(vals) if len(vals) > 1 else None


@dataclass
class PairedDiff:
    """OLoRA+ minus its baseline for one metric, paired by seed."""

    model: str
    arm: Arm
    metric: str
    seeds: list[int]
    diffs: list[float]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs)

    @property
    def interval(self) -> tuple[float, float] | None:
        """Two-sided 95% t confidence interval of the mean difference; None below two pairs."""
        if self.n < 2:
            return None
        half = student_t_ppf(0.5 + CONFIDENCE / 2, self.n - 1) * statistics.stdev(self.diffs) / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def verdict(self) -> str:
        ci = self.interval
        if ci is None:
            return "n/a (needs 2+ seeds)"
        lo, hi = ci
        good_up = not LOWER_IS_BETTER[self.metric]
        if lo > 0:
            return "better" if good_up else "worse"
        if hi < 0:
            return "worse" if good_up else "better"
        return "within noise"


@dataclass
class Summary:
    """Everything the report shows, computed from the rows."""

    rows: list[dict]
    models: list[str]
    stats: dict[str, list[ArmStats]]
    paired: dict[str, list[PairedDiff]]
    flags: dict[str, tuple[dict, list[str]]]  # model -> (flags shared by all its runs, differing names)
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)


def _paper_key(model: str) -> str | None:
    key = model.lower()
    key = _PAPER_ALIASES.get(key, key)
    return key if key in PAPER_TABLES else None


def _model_sort_key(model: str) -> tuple:
    paper = _paper_key(model)
    return (0, list(PAPER_TABLES).index(paper), model) if paper else (1, 0, model)


def _check_row(row: dict, where: str) -> None:
    for name in ("key", "model", "method", "ratio", "seed", "metrics"):
        if name not in row:
            raise UserError(f"{where} has no '{name}'; is this a runs.jsonl written by 'oloraplus sweep'?")
    missing = [m for m in METRIC_KEYS if m not in row["metrics"]]
    if missing:
        raise UserError(f"{where} ({row['key']}) has no metric(s) {', '.join(missing)}")


def summarize(rows: list[dict]) -> Summary:
    """Group runs by model and arm; pair OLoRA+ runs with the baseline run of the same seed."""
    by_key: dict[str, dict] = {}
    for i, row in enumerate(rows, start=1):
        _check_row(row, f"runs.jsonl line {i}")
        by_key[row["key"]] = row  # a repeated key: the later line wins
    duplicates = len(rows) - len(by_key)
    unique = sorted(by_key.values(),
                    key=lambda r: (_model_sort_key(r["model"]), Arm.of(r["method"], r["ratio"]), r["seed"]))
    models = sorted({r["model"] for r in unique}, key=_model_sort_key)
    stats: dict[str, list[ArmStats]] = {}
    paired: dict[str, list[PairedDiff]] = {}
    flags: dict[str, tuple[dict, list[str]]] = {}
    for model in models:
        mine = [r for r in unique if r["model"] == model]
        groups: dict[Arm, list[dict]] = {}
        for r in mine:
            groups.setdefault(Arm.of(r["method"], r["ratio"]), []).append(r)
        stats[model] = [
            ArmStats(model, arm, [r["seed"] for r in g], {m: [float(r["metrics"][m]) for r in g] for m in METRIC_KEYS},
                     sorted({str(r.get("metrics_mode")) for r in g}))
            for arm, g in sorted(groups.items())
        ]
        paired[model] = []
        for arm, group in sorted(groups.items()):
            base = groups.get(arm.baseline)
            if arm.is_baseline or base is None:
                continue
            base_by_seed = {r["seed"]: r for r in base}
            pairs = [(r, base_by_seed[r["seed"]]) for r in group if r["seed"] in base_by_seed]
            for metric in METRIC_KEYS:
                paired[model].append(PairedDiff(
                    model, arm, metric, [p["seed"] for p, _ in pairs],
                    [float(p["metrics"][metric]) - float(b["metrics"][metric]) for p, b in pairs]))
        all_flags = [r.get("flags") or {} for r in mine]
        names = sorted(set().union(*all_flags))
        shared = {k: all_flags[0].get(k) for k in names if all(f.get(k) == all_flags[0].get(k) for f in all_flags)}
        flags[model] = (shared, [k for k in names if k not in shared])
    return Summary(rows=unique, models=models, stats=stats, paired=paired, flags=flags, duplicates=duplicates)


def _num(metric: str, value: float) -> str:
    return f"{value:.{DECIMALS[metric]}f}"


def _best(stats: list[ArmStats], metric: str) -> str:
    """The best mean as displayed (ties at display precision are all bold)."""
    shown = [_num(metric, s.mean(metric)) for s in stats]
    pick = min if LOWER_IS_BETTER[metric] else max
    return _num(metric, pick(float(x) for x in shown))


def _cell(s: ArmStats, metric: str) -> str:
    std = s.std(metric)
    return _num(metric, s.mean(metric)) + ("" if std is None else f" ± {_num(metric, std)}")


def _modes_text(stats: list[ArmStats]) -> str:
    modes = sorted({m for s in stats for m in s.modes})
    if len(modes) == 1:
        return modes[0]
    return f"MIXED ({', '.join(modes)}): rows are not comparable"


def _ratios_text(stats: list[ArmStats]) -> str:
    ratios = sorted({s.arm.ratio for s in stats if not s.arm.is_baseline})
    if not ratios:
        return "none (baseline only)"
    return ", ".join(ratio_text(r) + ("" if ratio_text(r) == repr(r) or float(r).is_integer() else f" (= {r!r})")
                     for r in ratios)


def _flags_text(flags: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(flags.items())) or "(defaults)"


def _paper_model_table(paper_key: str) -> list[str]:
    table, name, rows = PAPER_TABLES[paper_key]
    out = [f"Paper's {table}, {name} (as printed; single runs, λ values not given):", ""]
    out += md_table(["Method"] + [TITLES[m] for m in METRIC_KEYS],
                     [[label] + [f"{v:.2f}" for v in values] for label, values in zip(PAPER_ROWS, rows)])
    return out + [""]


def _model_section(summary: Summary, model: str) -> list[str]:
    stats = summary.stats[model]
    shared, differing = summary.flags[model]
    seeds = sorted({seed for s in stats for seed in s.seeds})
    lines = [f"## {model}", ""]
    lines.append(f"- λ (lr_B / lr_A) of the OLoRA+ rows: {_ratios_text(stats)}; baseline λ = 1")
    lines.append(f"- BLEU/ROUGE metrics mode: {_modes_text(stats)}")
    lines.append(f"- seeds: {', '.join(str(s) for s in seeds)}")
    lines.append(f"- train flags: {_flags_text(shared)}")
    if differing:
        lines.append(f"- flags that differ between runs of this model: {', '.join(differing)}")
    lines.append("")
    best = {m: _best(stats, m) for m in METRIC_KEYS}
    rows = []
    for s in stats:
        cells = []
        for m in METRIC_KEYS:
            cell = _cell(s, m)
            cells.append(f"**{cell}**" if _num(m, s.mean(m)) == best[m] else cell)
        rows.append([s.arm.label, str(s.n)] + cells)
    lines += md_table(["Method", "n"] + [TITLES[m] for m in METRIC_KEYS], rows,
                       ["---", "---:"] + ["---:"] * len(METRIC_KEYS))
    lines.append("")
    paper = _paper_key(model)
    if paper:
        lines += _paper_model_table(paper)
    lines += _paired_section(summary, model)
    return lines


def _paired_section(summary: Summary, model: str) -> list[str]:
    diffs = summary.paired[model]
    title = f"### {model}: paired differences (OLoRA+ − OLoRA, same seed)"
    if not diffs:
        return [title, "", "No OLoRA+ row has a baseline run to pair with.", ""]
    rows = []
    for d in diffs:
        ci = d.interval
        ci_text = "n/a" if ci is None else f"[{_signed(d.metric, ci[0])}, {_signed(d.metric, ci[1])}]"
        rows.append([f"{d.arm.label} − baseline", TITLES[d.metric], str(d.n), _signed(d.metric, d.mean), ci_text,
                     d.verdict])
    lines = [title, ""]
    lines += md_table(["Comparison", "Metric", "n seeds", "Mean diff", "95% CI", "Verdict"], rows,
                       ["---", "---", "---:", "---:", "---", "---"])
    stats = summary.stats[model]
    lines += ["", f"λ values: {_ratios_text(stats)}; metrics mode: {_modes_text(stats)}.", ""]
    return lines


def _signed(metric: str, value: float) -> str:
    """A signed difference at the metric's display precision."""
    return f"{value:+.{DECIMALS[metric]}f}"


def _best_section(summary: Summary) -> list[str]:
    lines = ["## Best per model (our Table 4)", "",
             "The best mean over the rows of each model's table, and the row it comes from.", ""]
    rows = []
    for model in summary.models:
        stats = summary.stats[model]
        cells = []
        for m in METRIC_KEYS:
            pick = min if LOWER_IS_BETTER[m] else max
            winner = pick(stats, key=lambda s: s.mean(m))  # ties: the first row (baseline first)
            cells.append(f"{_num(m, winner.mean(m))} ({winner.arm.short})")
        rows.append([model, _modes_text(stats)] + cells)
    lines += md_table(["LLM", "Metrics mode"] + [TITLES[m] for m in METRIC_KEYS], rows,
                       ["---", "---"] + ["---:"] * len(METRIC_KEYS))
    lines += ["", "Paper's Table 4, best per model (as printed):", ""]
    lines += md_table(["LLM"] + [TITLES[m] for m in METRIC_KEYS],
                       [[name] + [f"{v:.2f}" for v in values] for name, values in PAPER_TABLE4])
    return lines + [""]


def render_markdown(summary: Summary, source_name: str = "runs.jsonl", extra: list[str] | None = None) -> str:
    """The report; ``extra`` (e.g. the regime section) goes before the list of files."""
    lines = [
        "# OLoRA+ reproduction report",
        "",
        f"Built from `{source_name}`: {len(summary.rows)} runs, {len(summary.models)} model(s).",
        "Cells are mean ± sample standard deviation (ddof = 1) over seeds (no ± for a single seed); "
        "n = number of seeds. **Bold**: best mean per column at the shown precision (lowest eval loss, "
        "highest ROUGE/BLEU). Eval loss is the mean cross-entropy (nats) over response tokens; BLEU is "
        "sacrebleu corpus BLEU, ROUGE the rouge-score F1, both 0-100.",
        "",
        "Paired differences subtract the OLoRA baseline run of the same seed (same data split); the 95% "
        "interval is mean ± t(0.975, n−1)·sd/√n. Verdict: *better* / *worse* when the interval excludes 0 "
        "on the good / bad side (lower is better for eval loss), else *within noise*. Five metrics and "
        "several λ are tested without a multiple-comparison correction.",
        "",
        f"{PAPER_NOTE}",
        "",
    ]
    if summary.duplicates:
        lines += [f"Note: {summary.duplicates} repeated run key(s) in {source_name}; "
                  "the last line of each was used.", ""]
    for model in summary.models:
        lines += _model_section(summary, model)
    lines += _best_section(summary)
    shown = {_paper_key(m) for m in summary.models}
    rest = [k for k in PAPER_TABLES if k not in shown]
    if rest:
        lines += ["## The paper's other tables (as printed)", ""]
        for key in rest:
            lines += _paper_model_table(key)
    figures = ["figure_metrics.png (Figure 3 analogue: bars = mean, error bars = std over seeds; "
               "y axes zoomed, not from 0)"]
    if _ratio_curves(summary):
        figures.append("figure_ratio.png (metrics against log2 λ; band = min-max over seeds)")
    lines += extra or []
    lines += ["## Files", ""] + [f"- {f}" for f in ["results.csv", "tables.tex"] + figures] + [""]
    return "\n".join(lines)


def render_csv(summary: Summary) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["model", "method", "ratio", "label", "metrics_mode", "n", "seeds"]
    for m in METRIC_KEYS:
        header += [f"{m}_mean", f"{m}_std"]
    writer.writerow(header)
    for model in summary.models:
        for s in summary.stats[model]:
            row = [model, s.arm.method, repr(s.arm.ratio), s.arm.label, "/".join(s.modes), s.n,
                   " ".join(str(x) for x in s.seeds)]
            for m in METRIC_KEYS:
                std = s.std(m)
                row += [repr(s.mean(m)), "" if std is None else repr(std)]
            writer.writerow(row)
    return buf.getvalue()


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in text)


def _tex_label(arm: Arm) -> str:
    title = family_title(method_family(arm.method))
    if arm.is_baseline:
        return f"{title} (baseline)"
    r = ratio_text(arm.ratio)
    r = rf"\frac{{1}}{{{r[2:]}}}" if r.startswith("1/") else r
    return rf"{title}+ ($\lambda={r}$)"


def render_latex(summary: Summary) -> str:
    cols = " & ".join(TITLES[m] for m in METRIC_KEYS)
    out = ["% Generated by 'oloraplus report' from runs.jsonl; needs \\usepackage{booktabs}.", ""]
    for model in summary.models:
        stats = summary.stats[model]
        best = {m: _best(stats, m) for m in METRIC_KEYS}
        out += [r"\begin{table}[t]", r"\centering",
                rf"\caption{{{_tex(model)}: mean $\pm$ std over seeds ({_tex(_modes_text(stats))} metrics); "
                r"best per column in bold.}",
                r"\begin{tabular}{lr" + "r" * len(METRIC_KEYS) + "}", r"\toprule", rf"Method & $n$ & {cols} \\",
                r"\midrule"]
        for s in stats:
            cells = []
            for m in METRIC_KEYS:
                mean, std = _num(m, s.mean(m)), s.std(m)
                mean = rf"\textbf{{{mean}}}" if mean == best[m] else mean
                cells.append(mean + ("" if std is None else rf" $\pm$ {_num(m, std)}"))
            out.append(f"{_tex_label(s.arm)} & {s.n} & " + " & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", rf"\label{{tab:{_tex(model).replace(chr(92), '')}}}",
                r"\end{table}", ""]
    out += [r"\begin{table}[t]", r"\centering", r"\caption{Best mean per model.}",
            r"\begin{tabular}{l" + "r" * len(METRIC_KEYS) + "}", r"\toprule", rf"LLM & {cols} \\", r"\midrule"]
    for model in summary.models:
        stats = summary.stats[model]
        cells = []
        for m in METRIC_KEYS:
            pick = min if LOWER_IS_BETTER[m] else max
            cells.append(_num(m, pick(s.mean(m) for s in stats)))
        out.append(f"{_tex(model)} & " + " & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\label{tab:best}", r"\end{table}", ""]
    return "\n".join(out)


def plot_metrics(summary: Summary, path: Path) -> None:
    """Figure 3 analogue: one panel per metric, bars grouped by model, one bar per arm."""
    from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state

    arms = sorted({s.arm for model in summary.models for s in summary.stats[model]})
    colors = [f"C{i % 10}" for i in range(len(arms))]
    fig = Figure(figsize=(4.2 * len(FIGURE_METRICS), 4.8), layout="constrained")
    axes = fig.subplots(1, len(FIGURE_METRICS))
    width = 0.8 / max(len(arms), 1)
    for ax, metric, letter in zip(axes, FIGURE_METRICS, "abcde"):
        for j, arm in enumerate(arms):
            xs, means, stds = [], [], []
            for i, model in enumerate(summary.models):
                found = [s for s in summary.stats[model] if s.arm == arm]
                if found:
                    xs.append(i + (j - (len(arms) - 1) / 2) * width)
                    means.append(found[0].mean(metric))
                    stds.append(found[0].std(metric) or 0.0)
            ax.bar(xs, means, width, yerr=stds, capsize=3, color=colors[j], label=arm.label)
        ax.set_xticks(range(len(summary.models)), summary.models, rotation=15)
        ax.set_title(f"({letter}) {TITLES[metric]}")
        if LOWER_IS_BETTER[metric]:
            ax.set_ylabel("lower is better")
        # zoom on the differences as the paper's figure does, bars then start at the axis floor
        lows = [s.mean(metric) - (s.std(metric) or 0) for m in summary.models for s in summary.stats[m]]
        highs = [s.mean(metric) + (s.std(metric) or 0) for m in summary.models for s in summary.stats[m]]
        if lows:
            pad = 0.15 * (max(highs) - min(lows)) or 0.05 * abs(max(highs)) or 1.0
            ax.set_ylim(max(0.0, min(lows) - pad), max(highs) + pad)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(arms), 6))
    save_png(fig, path)


def _ratio_curves(summary: Summary) -> list[tuple[str, str, list[ArmStats]]]:
    """(model, family, arms incl. baseline by ratio) for every model run at more than two ratios."""
    curves = []
    for model in summary.models:
        families = sorted({method_family(s.arm.method) for s in summary.stats[model]})
        for family in families:
            arms = [s for s in summary.stats[model] if method_family(s.arm.method) == family]
            if len({s.arm.ratio for s in arms}) > 2:
                curves.append((model, family, sorted(arms, key=lambda s: s.arm.ratio)))
    return curves


def plot_ratio(summary: Summary, path: Path) -> bool:
    """Each metric against log2(lambda); returns False (and writes nothing) if no model has > 2 ratios."""
    curves = _ratio_curves(summary)
    if not curves:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(FIGURE_METRICS), 4.8), layout="constrained")
    axes = fig.subplots(1, len(FIGURE_METRICS))
    for ax, metric in zip(axes, FIGURE_METRICS):
        for k, (model, family, arms) in enumerate(curves):
            color = f"C{k % 10}"
            xs = [math.log2(s.arm.ratio) for s in arms]
            ax.plot(xs, [s.mean(metric) for s in arms], "o-", color=color,
                    label=f"{model} ({family_title(family)}+)")
            ax.fill_between(xs, [min(s.values[metric]) for s in arms], [max(s.values[metric]) for s in arms],
                            color=color, alpha=0.2, linewidth=0)
            base = [s for s in arms if s.arm.is_baseline]
            if base:
                ax.axhline(base[0].mean(metric), color=color, linestyle="--", linewidth=1)
        ax.set_xlabel("log2 λ (λ = lr_B / lr_A; 0 = baseline)")
        ax.set_title(TITLES[metric] + (" (lower is better)" if LOWER_IS_BETTER[metric] else ""))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(curves), 6))
    save_png(fig, path)
    return True


@dataclass
class ReportFiles:
    markdown: Path
    csv: Path
    latex: Path
    figure_metrics: Path
    figure_ratio: Path | None
    figure_dynamics: Path | None = None
    figure_drift_ratio: Path | None = None


def _optional_figure(path: Path, written: bool) -> Path | None:
    if not written:
        path.unlink(missing_ok=True)  # a stale one from an earlier, larger grid
    return path if written else None


def build_report(runs_jsonl: str | Path, output_dir: str | Path, analyses: list[str | Path] | None = None) -> ReportFiles:
    """Write report.md, results.csv, tables.tex and the figures into ``output_dir``.

    ``analyses``: ``analysis.json`` files for the regime section (default: ``DIR/analysis/analysis.json``
    and ``DIR/analysis/*/analysis.json``, those that exist, so a grid analysed in parts needs no flag);
    run folders' ``dynamics.jsonl`` files are found through ``runs.jsonl``.
    """
    from oloraplus.experiments.regimes import (
        check_analyses,
        collect,
        default_analyses,
        plot_drift_vs_ratio,
        plot_dynamics,
        render_section,
    )

    runs_jsonl = Path(runs_jsonl)
    if runs_jsonl.is_dir():
        runs_jsonl = runs_jsonl / "runs.jsonl"
    if not runs_jsonl.is_file():
        raise UserError(f"{runs_jsonl} not found; give the --output folder of 'oloraplus sweep/reproduce'")
    rows = read_runs(runs_jsonl)
    if not rows:
        raise UserError(f"{runs_jsonl} holds no finished runs yet")
    analyses = default_analyses(runs_jsonl.parent) if analyses is None else check_analyses(analyses)
    summary = summarize(rows)
    regimes = collect(summary.rows, runs_jsonl.parent, analyses)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out / "report.md", out / "results.csv", out / "tables.tex", out / "figure_metrics.png",
                        out / "figure_ratio.png")
    plot_metrics(summary, files.figure_metrics)
    files.figure_ratio = _optional_figure(files.figure_ratio, plot_ratio(summary, files.figure_ratio))
    files.figure_dynamics = _optional_figure(out / "figure_dynamics.png", plot_dynamics(regimes, out / "figure_dynamics.png"))
    files.figure_drift_ratio = _optional_figure(
        out / "figure_drift_ratio.png", plot_drift_vs_ratio(regimes, out / "figure_drift_ratio.png"))
    regime_figures = [f.name for f in (files.figure_dynamics, files.figure_drift_ratio) if f is not None]
    write_text_atomic(files.markdown, render_markdown(summary, runs_jsonl.name, render_section(regimes, regime_figures)))
    write_text_atomic(files.csv, render_csv(summary))
    write_text_atomic(files.latex, render_latex(summary))
    return files
