"""The report of the tuned best-vs-best study (``results/tuned/PLAN.md``), from a tune folder's final runs.

Input: a folder written by ``oloraplus tune --final-seeds N``: ``final/trials.csv`` (every tuning trial
of every method's study; else ``trials.csv``, the last tune command's methods) and
``final/<method>-s<seed>/`` (one run per method and seed at the method's best setting), each with
``results.json`` and ``eval_losses.json`` (per eval example: ``response_loss_sum``, ``response_tokens``,
``sequence_loss_sum``, ``sequence_tokens``, aligned with ``eval_indices``); optionally
``final-teacher-forced/runs.jsonl``, ``oloraplus rescore`` of the final runs in teacher-forced mode.

Output: ``report.md`` (opening with the answer in plain words, :func:`answer_lines`) and
``comparisons.csv``. For every pair of methods (15 for six), paired by seed:

- the mean difference (first minus second) of the response-only eval loss with a paired t interval
  over seeds (df = seeds - 1) and a paired bootstrap over eval examples (10,000 resamples, seeded:
  within each seed the examples are resampled, the same resample for both methods, and the
  token-weighted loss difference is recomputed; the seeds' differences are averaged);
- Holm-corrected p-values across the pairs of the family, for the t test and for the bootstrap
  separately; a difference is claimed only where both corrected tests reject at 0.05 with the same
  sign, otherwise the row reads "no difference shown";
- secondary families: BLEU and ROUGE-L of greedy generation and, once rescored, teacher-forced, t
  intervals over seeds with Holm within each metric.

Beside them: each method's best learning rate (and lambda) with the spread of the trials within 1%
of the best validation loss, and whether lambda != 1 helps beyond a tuned learning rate (each
``-plus`` method against its single-rate method, the rows of the primary family); and, where
``oloraplus analyze`` has measured the final runs' adapters (``analysis.json``), the regime table of
:mod:`oloraplus.experiments.regimes` at each method's best setting.

A missing or malformed ``eval_losses.json`` is a note in the report, not an error (the bootstrap of
that seed is then left out). Nothing here imports torch; the output is deterministic.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from oloraplus.errors import UserError
from oloraplus.experiments.arms import method_family, takes_ratio
from oloraplus.experiments.render import md_table
from oloraplus.experiments.report import student_t_ppf
from oloraplus.files import write_text_atomic
from oloraplus.method.registry import METHODS

FINAL_DIR = "final"

LOSSES_FILE = "eval_losses.json"

TRIALS_FILE = "trials.csv"

LOSSES_FORMAT = 1

LOSSES_KEYS = ("eval_indices", "response_loss_sum", "response_tokens", "sequence_loss_sum", "sequence_tokens")

RESAMPLES = 10_000

BOOTSTRAP_SEED = 20261201  # the plan's date: the resamples are the same on every machine and rerun

ALPHA = 0.05

CONFIDENCE = 0.95

SPREAD = 0.01  # trials within 1% of the best validation loss

PRIMARY = "eval_loss"

SECONDARY = ("bleu", "rougeL", "bleu_tf", "rougeL_tf")  # *_tf: teacher-forced, from TF_DIR

TITLES = {"eval_loss": "eval loss (response tokens)", "bleu": "BLEU", "rougeL": "ROUGE-L",
          "bleu_tf": "BLEU (teacher-forced)", "rougeL_tf": "ROUGE-L (teacher-forced)"}

LOWER_IS_BETTER = {"eval_loss": True, "bleu": False, "rougeL": False, "bleu_tf": False, "rougeL_tf": False}

TF_DIR = "final-teacher-forced"  # `oloraplus rescore OUTPUT/final --metrics-mode teacher-forced --output OUTPUT/final-teacher-forced`
# A rescore matches its run when the eval losses agree to this relative tolerance: loose enough for another host
# kind's rounding, tight enough to catch another adapter or eval split (results/tuned/PLAN.md, session 20).
TF_REL_TOL = 1e-4

TF_METRICS = {"bleu": "bleu_tf", "rougeL": "rougeL_tf"}  # rescore's metric -> its name here

NO_DIFFERENCE = "no difference shown"

NOT_COVERED = (
    "The tuning split (data seed 42) chose the settings, and seeds 1-4 draw eval records that may have been "
    "training or validation records of that split: the settings were not chosen on them, but they are not a "
    "fresh sample either. The intervals do not cover other data sets, other models, longer training, or the "
    "variation of the tuning itself (one study per method)."
)


# --- statistics -------------------------------------------------------------------------------------------------


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    Sorted ascending, the i-th (1-based) of m gets ``max_{j<=i} min(1, (m - j + 1) p_(j))``; a test
    rejects at level alpha iff its adjusted p-value is <= alpha. NaN entries (tests that could not be
    run) stay NaN and do not count in m.
    """
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Interval:
    """A point estimate, its two-sided interval and its two-sided p-value (against no difference)."""

    estimate: float
    low: float
    high: float
    p: float
    n: int  # seeds (t) or seeds resampled (bootstrap)


def paired_t(diffs: list[float], confidence: float = CONFIDENCE) -> Interval | None:
    """The paired t interval and test of the mean of ``diffs`` (one difference per seed; df = n - 1).

    None below two differences. Differences all equal: the interval is that value, and p is 1 when it
    is 0, else 0.
    """
    n = len(diffs)
    if n < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n)
    if se == 0:
        return Interval(mean, mean, mean, 1.0 if mean == 0 else 0.0, n)
    half = student_t_ppf(0.5 + confidence / 2, n - 1) * se
    return Interval(mean, mean - half, mean + half, float(2 * t.sf(abs(mean) / se, n - 1)), n)


def resample_indices(n: int, seed: int, resamples: int = RESAMPLES, base_seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """The bootstrap draw of run seed ``seed``: ``resamples`` x ``n`` example positions, with replacement,
    from ``numpy.random.default_rng([base_seed, seed]).integers(0, n, (resamples, n))``. Every method of that
    seed is resampled with the same rows, which pairs them."""
    return np.random.default_rng([base_seed, seed]).integers(0, n, size=(resamples, n))


def resampled_loss(loss_sum, tokens, idx: np.ndarray) -> np.ndarray:
    """Token-weighted loss of each resample (row of ``idx``): sum of loss over sum of tokens."""
    loss_sum, tokens = np.asarray(loss_sum, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    return loss_sum[idx].sum(axis=1) / tokens[idx].sum(axis=1)


def token_weighted(loss_sum, tokens) -> float:
    return float(np.sum(np.asarray(loss_sum, dtype=np.float64)) / np.sum(np.asarray(tokens, dtype=np.float64)))


def bootstrap_from_draws(estimate: float, draws: np.ndarray, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Percentile interval of the resampled differences ``draws`` and the two-sided bootstrap p-value
    ``min(1, 2 min((#{d <= 0} + 1) / (B + 1), (#{d >= 0} + 1) / (B + 1)))``."""
    b = len(draws)
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    below, above = (int(np.sum(draws <= 0)) + 1) / (b + 1), (int(np.sum(draws >= 0)) + 1) / (b + 1)
    return Interval(estimate, float(low), float(high), min(1.0, 2 * min(below, above)), n)


def paired_bootstrap(per_seed: dict[int, tuple], resamples: int = RESAMPLES, base_seed: int = BOOTSTRAP_SEED,
                     confidence: float = CONFIDENCE) -> Interval:
    """Paired bootstrap over eval examples of the token-weighted loss difference, averaged over seeds.

    ``per_seed`` maps a run seed to ``(a_loss_sum, a_tokens, b_loss_sum, b_tokens)``, per-example arrays
    of methods a and b aligned on the same eval examples. Within each seed the examples are resampled
    (:func:`resample_indices`, the same rows for a and b); each resample's difference is
    ``sum(a_loss)/sum(a_tokens) - sum(b_loss)/sum(b_tokens)``, averaged over the seeds. The estimate is
    that difference on the examples as they are.
    """
    if not per_seed:
        raise ValueError("paired_bootstrap needs at least one seed")
    total = np.zeros(resamples)
    estimate = 0.0
    for seed, (a_loss, a_tok, b_loss, b_tok) in sorted(per_seed.items()):
        idx = resample_indices(len(a_loss), seed, resamples, base_seed)
        total += resampled_loss(a_loss, a_tok, idx) - resampled_loss(b_loss, b_tok, idx)
        estimate += token_weighted(a_loss, a_tok) - token_weighted(b_loss, b_tok)
    k = len(per_seed)
    return bootstrap_from_draws(estimate / k, total / k, k, confidence)


# --- reading ----------------------------------------------------------------------------------------------------


@dataclass
class FinalRun:
    """One final run: a method at its best setting, one seed."""

    method: str
    seed: int
    folder: str
    metrics: dict
    lr: float
    ratio: float | None
    data_seed: int | None
    losses: dict | None  # eval_losses.json, checked; None when missing or malformed
    note: str | None = None  # why ``losses`` is None, or a mismatch worth saying
    model: str | None = None  # config.model, as ``oloraplus analyze`` records it


def read_eval_losses(path: Path) -> tuple[dict | None, str | None]:
    """``eval_losses.json`` as arrays sorted by eval index (so two runs of one split line up example by
    example), or ``(None, why)`` when it is missing or not the known format."""
    if not path.exists():
        return None, f"{path.parent.name}: no {LOSSES_FILE}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, RecursionError) as exc:
        return None, f"{path.parent.name}: {LOSSES_FILE} is not readable JSON ({type(exc).__name__})"
    if not isinstance(data, dict) or data.get("format") != LOSSES_FORMAT:
        return None, f"{path.parent.name}: {LOSSES_FILE} is not format {LOSSES_FORMAT}"
    missing = [k for k in LOSSES_KEYS if not isinstance(data.get(k), list)]
    if missing:
        return None, f"{path.parent.name}: {LOSSES_FILE} has no list {', '.join(missing)}"
    lengths = {len(data[k]) for k in LOSSES_KEYS}
    if len(lengths) != 1 or lengths == {0}:
        return None, f"{path.parent.name}: {LOSSES_FILE} lists of different lengths (or empty)"
    try:
        indices = np.asarray([int(i) for i in data["eval_indices"]], dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        out = {"eval_indices": [int(i) for i in indices[order]],
               **{k: np.asarray(data[k], dtype=np.float64)[order] for k in LOSSES_KEYS[1:]}}
    except (TypeError, ValueError):
        return None, f"{path.parent.name}: {LOSSES_FILE} holds non-numbers"
    if len(set(out["eval_indices"])) != len(out["eval_indices"]):
        return None, f"{path.parent.name}: {LOSSES_FILE} lists an eval index twice"
    if not (np.all(np.isfinite(out["response_loss_sum"])) and np.sum(out["response_tokens"]) > 0):
        return None, f"{path.parent.name}: {LOSSES_FILE} has non-finite losses or no response tokens"
    return out, None


def read_final_runs(final_dir: str | Path) -> list[FinalRun]:
    """Every finished run (a folder with ``results.json``) directly below ``final_dir``, sorted by method
    (registry order) and seed. Method, seed, lr, ratio and data seed come from ``results.json``'s config."""
    final_dir = Path(final_dir)
    if not final_dir.is_dir():
        raise UserError(f"{final_dir} does not exist; run 'oloraplus tune ... --final-seeds N' first")
    runs = []
    for results_file in sorted(final_dir.glob("*/results.json")):
        try:
            results = json.loads(results_file.read_text(encoding="utf-8"))
            config, metrics = results["config"], results["metrics"]
            method, seed = config["method"], int(config["seed"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{results_file} is not a results.json of 'oloraplus train' ({type(exc).__name__}: "
                            f"{exc}); delete that run folder to redo it") from None
        if PRIMARY not in metrics:
            raise UserError(f"{results_file} has no eval_loss (a run with --no-evaluate?); delete it to redo it")
        losses, note = read_eval_losses(results_file.parent / LOSSES_FILE)
        if losses is not None:
            note = _check_losses(results, losses, results_file.parent.name)
        runs.append(FinalRun(method, seed, results_file.parent.name, metrics, float(config["lr"]),
                             config.get("ratio") if takes_ratio(method) else None, config.get("data_seed"),
                             losses, note, config.get("model")))
    order = list(METHODS)
    keys = [(r.method, r.seed) for r in runs]
    if len(set(keys)) != len(keys):
        raise UserError(f"{final_dir} holds two runs of one method and seed")
    return sorted(runs, key=lambda r: (order.index(r.method) if r.method in order else len(order), r.method, r.seed))


def attach_teacher_forced(runs: list[FinalRun], tf_dir: str | Path) -> list[str]:
    """Add the teacher-forced BLEU/ROUGE-L of ``tf_dir/runs.jsonl`` (``oloraplus rescore`` of the final runs) to
    the matching runs' metrics (by method and seed, as ``bleu_tf``/``rougeL_tf``); returns notes: a rescored
    eval loss that differs from the run's own by more than ``TF_REL_TOL`` (another adapter or split, not another
    host's rounding) is not attached but noted."""
    from oloraplus.experiments.report import read_runs

    path = Path(tf_dir) / "runs.jsonl"
    if not path.is_file():
        return []
    notes = []
    by_key = {(r.method, r.seed): r for r in runs}
    for row in read_runs(path):
        run = by_key.get((row.get("method"), row.get("seed")))
        metrics = row.get("metrics") or {}
        if run is None or row.get("metrics_mode") != "teacher-forced":
            continue
        if not math.isclose(float(metrics.get(PRIMARY, math.nan)), float(run.metrics[PRIMARY]), rel_tol=TF_REL_TOL):
            notes.append(f"{run.folder}: the teacher-forced rescore gives eval loss {metrics.get(PRIMARY)}, the run "
                         f"{run.metrics[PRIMARY]}: its teacher-forced scores are left out")
            continue
        run.metrics.update({ours: float(metrics[theirs]) for theirs, ours in TF_METRICS.items() if theirs in metrics})
    return notes


def _check_losses(results: dict, losses: dict, name: str) -> str | None:
    """A note when the per-example losses disagree with results.json (other eval records, other loss)."""
    indices = (results.get("data") or {}).get("eval_indices")
    if isinstance(indices, list) and sorted(indices) != sorted(losses["eval_indices"]):
        return f"{name}: {LOSSES_FILE} lists other eval records than results.json"
    mean = token_weighted(losses["response_loss_sum"], losses["response_tokens"])
    if not math.isclose(mean, float(results["metrics"][PRIMARY]), rel_tol=1e-3):
        return f"{name}: {LOSSES_FILE} gives eval loss {mean:.4f}, results.json {results['metrics'][PRIMARY]:.4f}"
    return None


def read_trials(path: str | Path) -> list[dict]:
    """``trials.csv`` rows with numbers parsed (empty list if the file is missing)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({"method": row["method"], "number": int(row["number"]), "state": row["state"],
                             **{k: float(row[k]) if row.get(k) else None for k in ("lr", "ratio", "val_loss")}})
            except (KeyError, ValueError):
                raise UserError(f"{path}: a row is not a trial of 'oloraplus tune' ({row})") from None
    return rows


def best_trial(rows: list[dict]) -> dict | None:
    """The COMPLETE trial of lowest validation loss, the earliest (lowest number) on a tie; None if none."""
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["val_loss"] is not None]
    return min(complete, key=lambda r: (r["val_loss"], r["number"])) if complete else None


def spread(rows: list[dict], within: float = SPREAD) -> list[dict]:
    """The COMPLETE trials whose validation loss is at most ``(1 + within)`` times the best one's."""
    best = best_trial(rows)
    if best is None:
        return []
    limit = best["val_loss"] * (1 + within)
    return sorted((r for r in rows if r["state"] == "COMPLETE" and r["val_loss"] is not None
                   and r["val_loss"] <= limit), key=lambda r: (r["val_loss"], r["number"]))


# --- comparisons ------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Method a minus method b on one metric, paired by seed."""

    metric: str
    a: str
    b: str
    seeds: list[int]
    t: Interval | None
    bootstrap: Interval | None = None
    bootstrap_seeds: list[int] = field(default_factory=list)
    t_holm: float = math.nan
    bootstrap_holm: float = math.nan

    @property
    def family(self) -> str:
        return "primary" if self.metric == PRIMARY else "secondary"

    def _better(self, estimate: float) -> str:
        lower = LOWER_IS_BETTER[self.metric]
        return self.a if (estimate < 0) == lower else self.b

    @property
    def verdict(self) -> str:
        """"<method> better" when every corrected test that could run rejects (both, for the eval loss with
        per-example losses) with the same sign; otherwise "no difference shown" (with why)."""
        if self.t is None:
            return "n/a (needs 2+ seeds in common)"
        t_rejects = self.t_holm <= ALPHA and self.t.estimate != 0
        if self.bootstrap is None:
            only = " (t test only: no per-example losses)" if self.metric == PRIMARY else ""
            return f"{self._better(self.t.estimate)} better{only}" if t_rejects else NO_DIFFERENCE
        b_rejects = self.bootstrap_holm <= ALPHA and self.bootstrap.estimate != 0
        same_sign = (self.t.estimate > 0) == (self.bootstrap.estimate > 0)
        if t_rejects and b_rejects and same_sign:
            return f"{self._better(self.t.estimate)} better"
        if t_rejects:
            return f"{NO_DIFFERENCE} (the eval-example bootstrap does not reject)"
        if b_rejects:
            return f"{NO_DIFFERENCE} across seeds (only the eval-example bootstrap rejects)"
        return NO_DIFFERENCE


@dataclass
class TunedSummary:
    model: str | None
    runs: list[FinalRun]
    methods: list[str]
    comparisons: list[Comparison]
    trials: list[dict]
    notes: list[str]
    resamples: int = RESAMPLES
    regimes: list[str] = field(default_factory=list)  # the regime section's lines (empty: no analysis)


def _by_method(runs: list[FinalRun]) -> dict[str, dict[int, FinalRun]]:
    out: dict[str, dict[int, FinalRun]] = {}
    for r in runs:
        out.setdefault(r.method, {})[r.seed] = r
    return out


def compare(runs: list[FinalRun], resamples: int = RESAMPLES, base_seed: int = BOOTSTRAP_SEED,
            trials: list[dict] | None = None, model: str | None = None) -> TunedSummary:
    """Every pairwise comparison of the methods in ``runs`` (primary: eval loss, with the bootstrap;
    secondary: BLEU and ROUGE-L, generated and, where rescored, teacher-forced), Holm-corrected within each
    metric's family."""
    by_method = _by_method(runs)
    methods = list(by_method)
    notes = [r.note for r in runs if r.note]
    comparisons: list[Comparison] = []
    draws: dict[tuple[str, int], np.ndarray] = {}  # (method, seed) -> resampled losses (same rows per seed)
    idx_cache: dict[tuple[int, int], np.ndarray] = {}
    for metric in (PRIMARY, *_scored(runs)):
        family = []
        for a, b in combinations(methods, 2):
            seeds = sorted(set(by_method[a]) & set(by_method[b]))
            have = [s for s in seeds if metric in by_method[a][s].metrics and metric in by_method[b][s].metrics]
            diffs = [float(by_method[a][s].metrics[metric]) - float(by_method[b][s].metrics[metric]) for s in have]
            comp = Comparison(metric, a, b, have, paired_t(diffs))
            if metric == PRIMARY:
                _bootstrap(comp, by_method, draws, idx_cache, resamples, base_seed, notes)
            family.append(comp)
        for comp, p in zip(family, holm([c.t.p if c.t else math.nan for c in family])):
            comp.t_holm = p
        for comp, p in zip(family, holm([c.bootstrap.p if c.bootstrap else math.nan for c in family])):
            comp.bootstrap_holm = p
        comparisons += family
    return TunedSummary(model, runs, methods, comparisons, trials or [], list(dict.fromkeys(notes)), resamples)


def _bootstrap(comp: Comparison, by_method, draws, idx_cache, resamples, base_seed, notes) -> None:
    """The paired bootstrap of ``comp`` (eval loss) over the seeds where both runs have per-example losses
    on the same eval records (the same computation as :func:`paired_bootstrap`, resamples cached per run)."""
    total, estimate, used = np.zeros(resamples), 0.0, []
    for s in comp.seeds:
        ra, rb = by_method[comp.a][s], by_method[comp.b][s]
        if ra.losses is None or rb.losses is None:
            continue
        if ra.losses["eval_indices"] != rb.losses["eval_indices"]:  # both sorted by eval index
            notes.append(f"seed {s}: {comp.a} and {comp.b} were evaluated on different eval records; "
                         "that seed is left out of their bootstrap")
            continue
        n = len(ra.losses["eval_indices"])
        if (n, s) not in idx_cache:
            idx_cache[(n, s)] = resample_indices(n, s, resamples, base_seed)
        for run in (ra, rb):
            if (run.method, s) not in draws:
                draws[(run.method, s)] = resampled_loss(run.losses["response_loss_sum"],
                                                        run.losses["response_tokens"], idx_cache[(n, s)])
        total += draws[(comp.a, s)] - draws[(comp.b, s)]
        estimate += (token_weighted(ra.losses["response_loss_sum"], ra.losses["response_tokens"])
                     - token_weighted(rb.losses["response_loss_sum"], rb.losses["response_tokens"]))
        used.append(s)
    if used:
        comp.bootstrap = bootstrap_from_draws(estimate / len(used), total / len(used), len(used))
        comp.bootstrap_seeds = used


# --- rendering --------------------------------------------------------------------------------------------------


def _label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return "n/a" if math.isnan(x) else ("<0.0001" if x < 1e-4 else f"{x:.4f}")


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _interval(iv: Interval | None, digits: int) -> str:
    if iv is None:
        return "n/a"
    return f"{iv.estimate:+.{digits}f} [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]"


def _mean_sd(values: list[float], digits: int) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _digits(metric: str) -> int:
    return 4 if metric == PRIMARY else 2


def _scored(runs: list[FinalRun]) -> list[str]:
    """The secondary metrics that some final run has (teacher-forced ones only once rescored)."""
    return [m for m in SECONDARY if any(m in r.metrics for r in runs)]


def _of_seeds(cell: str, have: int, seeds: int) -> str:
    """A table cell over ``have`` of a method's ``seeds`` final runs, saying so when some are missing."""
    return cell if have == seeds else f"{cell} ({have} of {seeds} seeds)"


def _teacher_forced_status(runs: list[FinalRun]) -> str | None:
    """One line unless every final run has teacher-forced scores: none scored yet (and how to score them), or
    how many are (a rescore still to run, or left out as the notes say)."""
    missing = [r.folder for r in runs if not any(m in r.metrics for m in TF_METRICS.values())]
    if not missing:
        return None
    if len(missing) == len(runs):
        return (f"Teacher-forced BLEU/ROUGE-L: not scored yet (`oloraplus rescore OUTPUT/{FINAL_DIR} --metrics-mode "
                f"teacher-forced --output OUTPUT/{TF_DIR}`, then this report again).")
    return (f"Teacher-forced BLEU/ROUGE-L: {len(runs) - len(missing)} of {len(runs)} final runs have them; each "
            f"comparison uses the seeds both methods have. Without (not rescored, or left out as noted): "
            f"{', '.join(sorted(missing))}.")


def _methods_table(summary: TunedSummary) -> list[str]:
    by_method = _by_method(summary.runs)
    shown = _scored(summary.runs)
    rows = []
    for method in summary.methods:
        runs = [by_method[method][s] for s in sorted(by_method[method])]
        lrs = sorted({r.lr for r in runs})
        ratios = sorted({r.ratio for r in runs if r.ratio is not None})
        seq = [token_weighted(r.losses["sequence_loss_sum"], r.losses["sequence_tokens"]) for r in runs if r.losses]
        rows.append([_label(method), ", ".join(_g(x) for x in lrs), ", ".join(_g(x) for x in ratios) or "—",
                     ", ".join(str(r.seed) for r in runs),
                     _mean_sd([float(r.metrics[PRIMARY]) for r in runs], 4),
                     _of_seeds(_mean_sd(seq, 4), len(seq), len(runs)),
                     *(_of_seeds(_mean_sd(v, 2), len(v), len(runs))
                       for v in ([float(r.metrics[m]) for r in runs if m in r.metrics] for m in shown))])
    return md_table(["method", "lr_A", "λ", "seeds", "eval loss", "sequence loss", *(TITLES[m] for m in shown)], rows)


PAPER_EVAL_LOSS = (75.0, 88.0)  # the range of the paper's "eval loss" column (shared/paper tables), unit not stated


def _paper_scale_text(summary: TunedSummary) -> str:
    """Whether 100x either of our cross-entropies (per final run) lands in the paper's eval-loss range."""
    low, high = PAPER_EVAL_LOSS
    measures = {"response-only eval loss": [100 * float(r.metrics[PRIMARY]) for r in summary.runs]}
    seq = [100 * token_weighted(r.losses["sequence_loss_sum"], r.losses["sequence_tokens"])
           for r in summary.runs if r.losses]
    if seq:
        measures["whole-sequence (prompt + response) loss"] = seq
    parts = []
    for name, values in measures.items():
        inside = sum(low <= v <= high for v in values)
        where = ("all inside" if inside == len(values) else "none inside" if inside == 0
                 else f"{inside} of {len(values)} inside")
        parts.append(f"100 × the {name} of the {len(values)} final runs spans {min(values):.1f}-{max(values):.1f} "
                     f"({where} the paper's {low:g}-{high:g})")
    return (f"The paper reports an \"eval loss\" of {low:g}-{high:g} without a unit. " + "; ".join(parts)
            + ". Whether the paper's numbers are 100 × a mean cross-entropy can be judged only from this: the "
            "models and data sizes differ from the paper's.")


def _tuning_table(summary: TunedSummary) -> list[str]:
    rows = []
    for method in summary.methods:
        mine = [t for t in summary.trials if t["method"] == method]
        best = best_trial(mine)
        if best is None:
            rows.append([_label(method), "no complete trial in trials.csv", "", "", "", ""])
            continue
        near = spread(mine)
        lrs = [t["lr"] for t in near]
        ratios = [t["ratio"] for t in near if t["ratio"] is not None]
        counts = ", ".join(f"{sum(t['state'] == s for t in mine)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL")
                           if any(t["state"] == s for t in mine))
        rows.append([_label(method), f"{best['number']} ({best['val_loss']:.4f})", _g(best["lr"]), _g(best["ratio"]),
                     f"{len(near)}: lr {_g(min(lrs))}–{_g(max(lrs))}"
                     + (f", λ {_g(min(ratios))}–{_g(max(ratios))}" if ratios else ""), counts])
    return md_table(["method", "best trial (val loss)", "lr_A", "λ", "trials within 1%: range", "trials"], rows,
                    ["---", "---:", "---:", "---:", "---", "---"])


def _comparison_rows(comps: list[Comparison], bootstrap: bool) -> list[list[str]]:
    rows = []
    for c in comps:
        d = _digits(c.metric)
        row = [f"{_label(c.a)} − {_label(c.b)}", str(len(c.seeds)), _interval(c.t, d),
               _p(c.t.p) if c.t else "n/a", _p(c.t_holm)]
        if bootstrap:
            fewer = c.bootstrap is not None and len(c.bootstrap_seeds) != len(c.seeds)
            row += [_interval(c.bootstrap, d) + (f" ({len(c.bootstrap_seeds)} seeds)" if fewer else ""),
                    _p(c.bootstrap_holm)]
        rows.append(row + [c.verdict])
    return rows


def _align(header: list[str]) -> list[str]:
    """Text columns (the first and the verdict) left, numbers right."""
    return ["---"] + ["---:"] * (len(header) - 2) + ["---"]


def _comparison_header(bootstrap: bool) -> list[str]:
    head = ["a − b", "seeds", "t: mean [95% CI]", "t p", "t p (Holm)"]
    if bootstrap:
        head += ["bootstrap: diff [95% CI]", "bootstrap p (Holm)"]
    return head + ["verdict"]


def _negated(iv: Interval) -> Interval:
    """``iv`` of a − b as the interval of b − a."""
    return Interval(-iv.estimate, -iv.high, -iv.low, iv.p, iv.n)


def _flip_to_plus(comp: Comparison, iv: Interval | None) -> Interval | None:
    """``iv`` of ``comp`` (a − b) as plus − single."""
    return iv if iv is None or takes_ratio(comp.a) else _negated(iv)


def _plus_pairs(primary: list[Comparison]) -> list[tuple[Comparison, str, str]]:
    """(comparison, plus method, single-rate method) of each ``-plus`` method against its own single-rate one."""
    return [(c, *((c.a, c.b) if takes_ratio(c.a) else (c.b, c.a))) for c in primary
            if method_family(c.a) == method_family(c.b) and takes_ratio(c.a) != takes_ratio(c.b)]


def _better_worse(comp: Comparison) -> tuple[str, str, Interval]:
    """(better method, worse method, the t interval as better − worse) of a claimed eval-loss difference."""
    return (comp.a, comp.b, comp.t) if comp.t.estimate < 0 else (comp.b, comp.a, _negated(comp.t))


def answer_lines(summary: TunedSummary) -> list[str]:
    """The answer in plain words, from the primary family alone: the ranking by mean eval loss, the
    differences both corrected tests claim (with their t interval), and the verdict on λ ≠ 1."""
    by_method = _by_method(summary.runs)
    common = sorted(set.intersection(*(set(by_method[m]) for m in summary.methods)))  # seeds every method has
    if common:  # a mean over other seeds would rank the seeds' splits, not the methods
        means = {m: statistics.fmean(float(by_method[m][s].metrics[PRIMARY]) for s in common) for m in summary.methods}
        ranking = sorted(summary.methods, key=means.get)
        lines = [f"- Mean eval loss over the seeds every method has ({', '.join(map(str, common))}), each method at its "
                 "best setting, lowest first: " + ", ".join(f"{_label(m)} {means[m]:.4f}" for m in ranking) + "."]
    else:
        lines = ["- No seed has a run of every method yet: no ranking."]
    primary = [c for c in summary.comparisons if c.metric == PRIMARY]
    claimed = [c for c in primary if c.t is not None and c.verdict.split(" (")[0].endswith(" better")]
    if not any(c.t is not None for c in primary):
        lines.append("- No pair has two seeds in common yet: no difference can be tested.")
    elif claimed:
        parts = []
        for c in sorted(claimed, key=lambda c: -abs(c.t.estimate)):
            better, worse, iv = _better_worse(c)
            parts.append(f"{_label(better)} below {_label(worse)}: {iv.estimate:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]")
        lines.append(f"- Differences shown (both Holm-corrected tests, α = {ALPHA}; better − worse, paired t 95% CI "
                     f"over {len(claimed[0].seeds)} seeds): " + "; ".join(parts)
                     + f". Every other pair of the {len(primary)}: {NO_DIFFERENCE}.")
    else:
        lines.append(f"- No difference shown between any two of the {len(primary)} pairs after the Holm correction.")
    for c, plus_m, single in _plus_pairs(primary):
        iv = _flip_to_plus(c, c.t)
        if iv is None:
            continue
        lines.append(f"- λ ≠ 1 beyond a tuned lr, {_label(plus_m)} − {_label(single)}: {iv.estimate:+.4f} "
                     f"[{iv.low:+.4f}, {iv.high:+.4f}]: {c.verdict}.")
    return lines


def render_markdown(summary: TunedSummary) -> str:
    """The report as Markdown (deterministic for the same input)."""
    seeds = ", ".join(map(str, sorted({r.seed for r in summary.runs})))
    title = f"# Tuned best-vs-best: {summary.model}" if summary.model else "# Tuned best-vs-best"
    offsets = sorted({r.data_seed - r.seed for r in summary.runs if isinstance(r.data_seed, int)})
    data_seeds = " or ".join(f"`--data-seed {d} + s`" for d in offsets) or "its data seed"
    intro = (f"Final runs: {len(summary.runs)} ({len(summary.methods)} methods; seeds {seeds}), each method at its "
             "best tuning setting (lowest validation loss over its complete trials, the earliest trial on a tie), "
             f"trained on all training records (`--n-val 0`), seed s with {data_seeds}, evaluated once on "
             "the eval records. Built by `oloraplus report --tuned` from the run folders alone.")
    lines = [title, "", intro, ""]
    lines += ["## The answer", "", *answer_lines(summary), "",
              ("Eval loss only (the primary metric); the sections below give every interval, both tests and the "
               "secondary metrics."), ""]
    lines += ["## Final runs (mean ± sd over seeds)", "", *_methods_table(summary), "",
              ("Eval loss: mean response-token cross-entropy (nats), the primary metric. Sequence loss: the "
               "same over prompt and response tokens (from `eval_losses.json`). BLEU/ROUGE-L: greedy generation; "
               "teacher-forced: the argmax at each reference position (`oloraplus rescore`)."),
              ""]
    lines += ["## The paper's eval loss ({:g}-{:g})".format(*PAPER_EVAL_LOSS), "", _paper_scale_text(summary), ""]
    lines += ["## Best settings and their spread", ""]
    if summary.trials:
        lines += [*_tuning_table(summary), "",
                  ("The range covers the lr (and λ) of every complete trial whose validation loss is within 1% of "
                   "the best one's: a wide range means the setting is not pinned down by the search."), ""]
    else:
        lines += ["No trials.csv beside the final runs: the spread of the tuning is not shown.", ""]
    primary = [c for c in summary.comparisons if c.metric == PRIMARY]
    method_text = (
        f"Difference a − b (negative: a has the lower loss). t: paired over seeds (df = seeds − 1). Bootstrap: "
        f"{summary.resamples:,} resamples of the eval examples within each seed (the same resample for both "
        "methods), token-weighted loss difference averaged over seeds; percentile interval. Both p-value columns "
        f"are Holm-corrected across the {len(primary)} comparisons (each test separately) at α = {ALPHA}. The "
        "intervals are 95% per comparison (not simultaneous). A difference is claimed only where both corrected "
        f"tests reject with the same sign; otherwise \"{NO_DIFFERENCE}\".")
    lines += ["## Primary: eval loss, every pair of methods", "", method_text, "",
              *md_table(_comparison_header(True), _comparison_rows(primary, True), _align(_comparison_header(True))),
              ""]
    plus = _plus_pairs(primary)
    lines += ["## Does λ ≠ 1 help beyond a tuned learning rate?", ""]
    if plus:
        lines += [("Each `-plus` method at its best (lr, λ) against its single-rate method at its best lr: the rows "
                   "of the primary family above (same Holm correction), signed plus − single."), ""]
        rows = []
        for c, plus_m, single in plus:
            rows.append([f"{_label(plus_m)} − {_label(single)}", _interval(_flip_to_plus(c, c.t), 4), _p(c.t_holm),
                         _interval(_flip_to_plus(c, c.bootstrap), 4), _p(c.bootstrap_holm), c.verdict])
        header = ["plus − single", "t: mean [95% CI]", "t p (Holm)", "bootstrap [95% CI]", "bootstrap p (Holm)",
                  "verdict"]
        lines += md_table(header, rows, _align(header)) + [""]
    else:
        lines += ["No `-plus` method here with its single-rate method.", ""]
    lines += ["## Secondary: BLEU and ROUGE-L (labelled secondary)", "",
              ("Paired t intervals over seeds, Holm within each metric's family; difference a − b (positive: a "
               "scores higher). No per-example bootstrap (BLEU is a corpus score)."), ""]
    status = _teacher_forced_status(summary.runs)
    if status:
        lines += [status, ""]
    for metric in _scored(summary.runs):
        comps = [c for c in summary.comparisons if c.metric == metric]
        header = _comparison_header(False)
        lines += [f"### {TITLES[metric]}", "", *md_table(header, _comparison_rows(comps, False), _align(header)), ""]
    lines += summary.regimes
    lines += ["## What the intervals do not cover", "", f"From the plan (results/tuned/PLAN.md): {NOT_COVERED}", "",
              ("The t intervals cover the seed-to-seed variation (batch order and which records are trained and "
               "evaluated on) of these seeds only; the bootstrap covers only the sampling of eval examples given the "
               "trained adapters."), ""]
    missing = sorted({r.folder for r in summary.runs if r.losses is None})
    notes = list(summary.notes)
    if missing:
        notes.insert(0, f"{len(missing)} run(s) without usable per-example losses ({LOSSES_FILE}): "
                        f"{', '.join(missing)}; their seeds are left out of the bootstrap.")
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


CSV_COLUMNS = ("family", "metric", "a", "b", "seeds", "t_mean", "t_low", "t_high", "t_p", "t_p_holm",
               "bootstrap_seeds", "bootstrap_diff", "bootstrap_low", "bootstrap_high", "bootstrap_p",
               "bootstrap_p_holm", "verdict")


def render_csv(summary: TunedSummary) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in summary.comparisons:
        t, b = c.t, c.bootstrap
        writer.writerow([c.family, c.metric, c.a, c.b, " ".join(map(str, c.seeds)),
                         *(("", "", "", "") if t is None else (t.estimate, t.low, t.high, t.p)),
                         "" if math.isnan(c.t_holm) else c.t_holm, " ".join(map(str, c.bootstrap_seeds)),
                         *(("", "", "", "") if b is None else (b.estimate, b.low, b.high, b.p)),
                         "" if math.isnan(c.bootstrap_holm) else c.bootstrap_holm, c.verdict])
    return buf.getvalue()


@dataclass
class TunedReportFiles:
    markdown: Path
    csv: Path


def regime_lines(runs: list[FinalRun], tune_dir: Path, analyses: list[Path]) -> list[str]:
    """The regime section of the final runs (``oloraplus analyze`` of their adapters, matched by model,
    method, λ and seed; :mod:`oloraplus.experiments.regimes`), or no lines without a matching analysis."""
    from oloraplus.experiments.regimes import collect, render_section

    rows = [{"model": r.model, "method": r.method, "ratio": r.ratio if r.ratio is not None else 1.0, "seed": r.seed,
             "run_dir": f"{FINAL_DIR}/{r.folder}"} for r in runs]
    regimes = collect(rows, tune_dir, analyses)
    return render_section(regimes, [], title="Regimes: what each method's best setting did to the adapter")


def build_tuned_report(tune_dir: str | Path, output: str | Path | None = None, resamples: int = RESAMPLES,
                       base_seed: int = BOOTSTRAP_SEED, analyses: list[str | Path] | None = None) -> TunedReportFiles:
    """``report.md`` and ``comparisons.csv`` in ``output`` (default ``tune_dir``) from ``tune_dir/final/*``
    and ``tune_dir/final/trials.csv`` (else ``tune_dir/trials.csv``); a :class:`UserError` when there is no
    final run. ``analyses``: ``analysis.json`` files of the final runs for the regime section (default:
    ``tune_dir/analysis/analysis.json`` and ``tune_dir/analysis/*/analysis.json``, those that exist)."""
    from oloraplus.experiments.regimes import check_analyses, default_analyses

    tune_dir = Path(tune_dir)
    analyses = default_analyses(tune_dir) if analyses is None else check_analyses(analyses)
    runs = read_final_runs(tune_dir / FINAL_DIR)
    if not runs:
        raise UserError(f"{tune_dir / FINAL_DIR} holds no finished run (a folder with results.json)")
    tf_notes = attach_teacher_forced(runs, tune_dir / TF_DIR)
    model = None
    best = tune_dir / "best.json"
    if best.exists():
        try:
            model = json.loads(best.read_text(encoding="utf-8")).get("model")
        except (OSError, json.JSONDecodeError, AttributeError):
            model = None
    trials_file = tune_dir / FINAL_DIR / TRIALS_FILE
    trials = read_trials(trials_file if trials_file.exists() else tune_dir / TRIALS_FILE)
    summary = compare(runs, resamples, base_seed, trials, model)
    summary.notes += tf_notes
    summary.regimes = regime_lines(runs, tune_dir, analyses)
    out = Path(output) if output is not None else tune_dir
    out.mkdir(parents=True, exist_ok=True)
    files = TunedReportFiles(out / "report.md", out / "comparisons.csv")
    write_text_atomic(files.markdown, render_markdown(summary))
    write_text_atomic(files.csv, render_csv(summary))
    return files
