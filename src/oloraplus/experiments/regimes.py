"""The report's regime section: what each λ did to the adapter, per model, over seeds.

Built from two kinds of files that ``oloraplus analyze`` and ``--track-dynamics`` write:
``analysis.json`` (one aggregate per finished run: B's subspace drift from Q_r, relative
changes of B and A, ...) and each run folder's ``dynamics.jsonl`` (the same aggregates every K
steps, and at the last step: a run with no analysis entry is summarised by that last row, so a
grid whose adapters were not kept still gets its table). Runs are matched to ``runs.jsonl`` rows
by (model, method, ratio, seed), so an analysis made in another folder (or of reused runs) still
lands on the right row.

Like the rest of the report this never imports torch, and the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from oloraplus.errors import UserError
from oloraplus.experiments.arms import Arm
from oloraplus.experiments.render import md_table, save_png

# (key in an aggregate, column title, decimals or None for 3 significant digits); "attention:"/"mlp:" read the per-layer-type means.
REGIME_METRICS: tuple[tuple[str, str, int | None], ...] = (
    ("b_subspace_drift", "B drift", None),
    ("b_subspace_drift_vs_random", "B drift / random", None),
    ("attention:b_subspace_drift", "B drift (attn)", None),
    ("mlp:b_subspace_drift", "B drift (MLP)", None),
    ("attention:b_subspace_drift_per_dim", "drift per dim (attn)", None),
    ("mlp:b_subspace_drift_per_dim", "drift per dim (MLP)", None),
    ("b_rel_change", "‖ΔB‖/‖B₀‖", None),
    ("a_rel_change", "‖ΔA‖/‖A₀‖", None),
    ("b_orthonormality_error", "‖BᵀB−I‖", None),
    ("update_effective_rank", "update eff. rank", 1),
    ("start_in_top_subspace", "top-r share, step 0", None),
    ("update_in_top_subspace", "update in top-r of W", None),
)

DYNAMICS_TITLES = {"b_subspace_drift": "B subspace drift", "b_rel_change": "‖ΔB‖/‖B₀‖"}

DYNAMICS_METRICS = tuple(DYNAMICS_TITLES)

REGIME_DEFINITIONS = (
    "B drift: mean sin² of the principal angles between span(B_T) and span(B_0 = Q_r), 0 = same "
    "subspace; a random r-dim subspace of a layer with out outputs scores 1 − r/out on average (the "
    "random baseline; mean over this model's layers under each table). B drift / random: each layer's drift "
    "over its baseline. Drift per dim: each layer's drift over out − r, the directions B can turn into; "
    "a raw drift grows with the layer's width (a move of c per entry of B gives about (out − r)·c²), "
    "so attention and MLP layers are compared on the per-dimension drift. ‖ΔB‖/‖B₀‖, ‖ΔA‖/‖A₀‖: relative "
    "Frobenius change of the factors. ‖BᵀB−I‖: how far B_T is from orthonormal columns (0 at init). "
    "Update: s·(B_T A_T − B_0 A_0), its effective rank (exp of the entropy of its normalised singular "
    "values) and the share of its energy in the top-r left singular subspace of the original W; "
    "top-r share, step 0: the same share for span(Q_r) itself (‖U_rᵀQ_r‖²/r, before any training), what an "
    "update B_0·ΔA that keeps B = Q_r has on average (r/out for a random subspace). Under LoRA's init "
    "(B_0 = 0) the drift is measured against span(Q_r) of W and ‖ΔB‖ against ‖Q_r‖ = √r; under PiSSA's "
    "(B_0 = U_r·√(S_r/s)) against its own span(U_r), so its top-r share at step 0 is 1 and ‖BᵀB−I‖ is not given. "
    "Means over all adapted layers of a run, then mean ± std over seeds; with 2 seeds, the mean "
    "[95% t interval]. \"-\": not in the inputs (a run summarised by its dynamics.jsonl written before "
    "these columns existed)."
)


def _key(model, method, ratio, seed) -> tuple:
    return (str(model), str(method), float(ratio), seed)


def metric_value(aggregate: dict, key: str) -> float | None:
    """One value of an aggregate; ``attention:x`` and ``mlp:x`` read the per-layer-type means."""
    if ":" in key:
        kind, name = key.split(":", 1)
        value = (aggregate.get("by_layer_type") or {}).get(kind, {}).get(name)
    else:
        value = aggregate.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def read_analyses(paths: list[Path]) -> dict[tuple, dict]:
    """Aggregates by (model, method, ratio, seed) from ``analysis.json`` files (later files win)."""
    found: dict[tuple, dict] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = data["runs"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: not an analysis.json written by 'oloraplus analyze' ({exc})") from exc
        for e in entries:
            if e and e.get("aggregate"):
                found[_key(e["model"], e["method"], e["ratio"], e["seed"])] = {**e["aggregate"], "init": e.get("init")}
    return found


def read_dynamics(path: Path) -> list[dict]:
    """Rows of one ``dynamics.jsonl``, by step (a torn last line from a killed run is skipped)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return sorted((r for r in rows if "step" in r), key=lambda r: r["step"])


@dataclass
class RegimeStats:
    """One model x arm: the analysis aggregates over its seeds."""

    model: str
    method: str
    ratio: float
    seeds: list
    values: dict[str, list[float]]  # metric -> values of the seeds that have it

    def mean(self, key: str) -> float | None:
        vals = self.values.get(key) or []
        return statistics.fmean(vals) if vals else None

    def std(self, key: str) -> float | None:
        vals = self.values.get(key) or []
        return statistics.stdev(vals) if len(vals) > 1 else None


@dataclass
class Regimes:
    """The regime data of one report: analysis stats per model and dynamics curves per run."""

    stats: dict[str, list[RegimeStats]]  # model -> arms (in the report's arm order)
    dynamics: dict[str, list[tuple[str, float, object, list[dict]]]]  # model -> (method, ratio, seed, rows), λ descending
    random_drift: dict[str, float]  # model -> mean random-subspace drift baseline of its layers
    from_dynamics: int = 0  # runs whose aggregate is their dynamics.jsonl's last row (no analysis entry)

    @property
    def empty(self) -> bool:
        return not any(self.stats.values()) and not any(self.dynamics.values())


def _arm(method: str, ratio: float) -> Arm:
    return Arm.of(method, ratio)


def default_analyses(folder: Path) -> list[Path]:
    """``FOLDER/analysis/analysis.json`` and ``FOLDER/analysis/*/analysis.json``, those that exist (a grid
    analysed in parts needs no flag)."""
    base = Path(folder) / "analysis"
    return [p for p in [base / "analysis.json", *sorted(base.glob("*/analysis.json"))] if p.is_file()]


def check_analyses(paths: list[str | Path]) -> list[Path]:
    """``paths`` as Paths; a missing one is a :class:`UserError` that says how to write it."""
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"--analysis {path} not found; write it with 'oloraplus analyze RUN_DIR ... --output DIR'")
    return [Path(p) for p in paths]


def collect(rows: list[dict], grid_dir: Path, analysis_paths: list[Path]) -> Regimes:
    """Match analyses and dynamics files to the report's rows (``run_dir`` is relative to ``grid_dir``)."""
    analyses = read_analyses(analysis_paths)
    stats: dict[str, list[RegimeStats]] = {}
    dynamics: dict[str, list] = {}
    random_drift: dict[str, float] = {}
    from_dynamics = 0
    for model in dict.fromkeys(r["model"] for r in rows):
        groups: dict[tuple, list[tuple]] = {}
        for r in rows:
            if r["model"] != model:
                continue
            dyn = grid_dir / str(r.get("run_dir", "")) / "dynamics.jsonl"
            curve = read_dynamics(dyn) if r.get("run_dir") and dyn.is_file() else []
            if curve:
                dynamics.setdefault(model, []).append((r["method"], float(r["ratio"]), r["seed"], curve))
            agg = analyses.get(_key(model, r["method"], r["ratio"], r["seed"]))
            if agg is None and curve and curve[-1]["step"] > 0:
                # The callback's last row is taken at the run's last step, on the final adapter.
                agg = curve[-1]
                from_dynamics += 1
            if agg is not None:
                groups.setdefault((r["method"], float(r["ratio"])), []).append((r["seed"], agg))
                baseline = metric_value(agg, "b_subspace_drift_random_baseline")
                if baseline is not None:
                    random_drift.setdefault(model, baseline)
        stats[model] = [
            RegimeStats(model, method, ratio, [s for s, _ in group], {
                key: [v for v in (metric_value(agg, key) for _, agg in group) if v is not None]
                for key, _, _ in REGIME_METRICS
            })
            for (method, ratio), group in sorted(groups.items(), key=lambda kv: _arm(*kv[0]))
        ]
        dynamics.get(model, []).sort(key=lambda d: (-d[1], str(d[2])))  # top to bottom in the figure
    return Regimes(stats, dynamics, random_drift, from_dynamics)


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Student t interval of the mean of ``values`` (at least two)."""
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    mean = statistics.fmean(values)
    return mean - half, mean + half


def _cell(s: RegimeStats, key: str, decimals: int | None) -> str:
    mean, std = s.mean(key), s.std(key)
    if mean is None:
        return "-"
    fmt = (lambda x: f"{x:.3g}") if decimals is None else (lambda x: f"{x:.{decimals}f}")
    if len(s.values[key]) == 2:  # a std of two numbers says little: the 95% t interval of the mean
        lo, hi = t_interval(s.values[key])
        return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"
    if decimals is None:  # spans orders of magnitude across λ: three significant digits
        return f"{mean:.3g}" + (f" ± {std:.2g}" if std is not None else "")
    return f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if std is not None else "")


def render_section(regimes: Regimes, figures: list[str],
                   title: str = "Regimes: what each λ does to the adapter") -> list[str]:
    """The markdown regime section: one table per model, then the figures."""
    if regimes.empty:
        return []
    out = [f"## {title}", "", REGIME_DEFINITIONS, ""]
    if regimes.from_dynamics:
        out += [(f"{regimes.from_dynamics} run(s) have no `analyze` entry: their aggregates are the last row of "
                 "their dynamics.jsonl, the same metrics computed by the training callback on the final adapter."), ""]
    for model, arms in regimes.stats.items():
        if not arms:
            continue
        out += [f"### {model}", ""]
        header = ["Method", "seeds", *(title for _, title, _ in REGIME_METRICS)]
        rows = [[_arm(s.method, s.ratio).label, str(len(s.seeds)), *(_cell(s, k, d) for k, _, d in REGIME_METRICS)]
                for s in arms]
        out += md_table(header, rows, ["---", "---:", *["---:"] * len(REGIME_METRICS)]) + [""]
        if model in regimes.random_drift:
            out += [(f"Random-subspace drift baseline of {model}: {regimes.random_drift[model]:.3f} (mean of "
                     "1 − r/out over its adapted layers)."), ""]
    for name in figures:
        out += [f"![{name}]({name})", ""]
    return out


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state

    return Figure(figsize=(width, height), layout="constrained")


def _ratio_colour(ratio: float):
    """Black for λ = 1, blues below and reds above, darker the further from 1 (to 1/16 and 16)."""
    from matplotlib import colormaps

    if ratio == 1.0:
        return "black"
    x = max(-1.0, min(1.0, math.log2(ratio) / 4.0))  # log2 λ of ±4 is the end of the scale
    return colormaps["coolwarm"](0.5 + 0.5 * (0.35 + 0.65 * abs(x)) * (1 if x > 0 else -1))


def plot_dynamics(regimes: Regimes, path: Path) -> bool:
    """Drift and relative change of B over training steps (log scale), one line per tracked run."""
    models = [m for m, curves in regimes.dynamics.items() if curves]
    if not models:
        return False
    fig = _figure(5.0 * len(DYNAMICS_METRICS), 3.0 * len(models))
    axes = fig.subplots(len(models), len(DYNAMICS_METRICS), squeeze=False)
    for row, model in enumerate(models):
        for col, key in enumerate(DYNAMICS_METRICS):
            ax = axes[row][col]
            # Top to bottom by λ, coloured by log2 λ (blue: Refinement, red: Exploration, black: λ = 1).
            for method, ratio, seed, curve in regimes.dynamics[model]:
                points = [(r["step"], r[key]) for r in curve if r["step"] > 0 and r.get(key)]  # log axis: no start
                if points:
                    ax.plot(*zip(*points), "-o", ms=2, lw=1.2, color=_ratio_colour(ratio),
                            label=f"{_arm(method, ratio).label} (seed {seed})")
            ax.set_yscale("log")
            ax.set_xlabel("training step")
            ax.set_title(f"{model}: {DYNAMICS_TITLES[key]}", fontsize=9)
            if col == len(DYNAMICS_METRICS) - 1:
                ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    save_png(fig, path)
    return True


def plot_drift_vs_ratio(regimes: Regimes, path: Path) -> bool:
    """Drift and relative change of B against log2 λ, mean and min-max band over seeds."""
    models = [m for m, arms in regimes.stats.items() if len({s.ratio for s in arms}) > 2]
    if not models:
        return False
    fig = _figure(5.0 * len(DYNAMICS_METRICS), 3.0)
    axes = fig.subplots(1, len(DYNAMICS_METRICS), squeeze=False)[0]
    for ax, key in zip(axes, DYNAMICS_METRICS):
        for model in models:
            arms = sorted((s for s in regimes.stats[model] if s.values.get(key)), key=lambda s: s.ratio)
            xs = [math.log2(s.ratio) for s in arms]
            (line,) = ax.plot(xs, [s.mean(key) for s in arms], "-o", ms=3, label=model)
            ax.fill_between(xs, [min(s.values[key]) for s in arms], [max(s.values[key]) for s in arms],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_yscale("log")
        ax.axvline(0.0, color="k", lw=0.5, ls=":")
        ax.set_xlabel("log2 λ (λ = lr_B / lr_A; 0 = OLoRA)")
        ax.set_title(DYNAMICS_TITLES[key], fontsize=9)
        ax.legend(fontsize=7)
    save_png(fig, path)
    return True
