"""The reproduction grid: which runs make up an experiment, and running them resumably.

A grid is models x arms x seeds, where an *arm* is a method at one ratio lambda = lr_B / lr_A.
The baseline arm is plain OLoRA (``method="olora"``, ratio 1); every other ratio is an
``olora-plus`` arm. All seeds of a grid share one data split (``data_seed`` is a train flag, not
a grid axis), so the OLoRA+ and OLoRA runs of one seed differ only in the ratio and can be
compared pairwise (see :mod:`oloraplus.experiments.report`).

Each run writes its own folder ``<output>/runs/<model>/<method>-r<ratio>-s<seed>``; a run is
complete iff its ``results.json`` exists, because :func:`oloraplus.training.recipe.train` writes that file
last and atomically. So an interrupted grid is resumed by running the same command again:
complete runs are skipped, a folder without ``results.json`` is redone from scratch. After each
complete run one line is appended (atomically) to ``<output>/runs.jsonl``, the only input the
report needs.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import re
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

from oloraplus.data.records import local_data_file
from oloraplus.errors import UserError
from oloraplus.experiments.report import read_runs
from oloraplus.files import append_jsonl_atomic, sha256_file, write_text_atomic
from oloraplus.method.registry import METHODS, get_method
from oloraplus.models.loading import resolve_model
from oloraplus.outputs import shared_work_claim, waiting_lock
from oloraplus.training.config import RESULT_NEUTRAL_FLAGS, TrainConfig
from oloraplus.training.recipe import train

BASELINE_METHOD = "olora"

PLUS_METHOD = "olora-plus"

DEFAULT_RATIOS = (1 / 16, 16.0)  # the paper writes lambda << 1 and >> 1 and gives no values

DEFAULT_SEEDS = 3

# TrainConfig fields a grid sets itself; everything else is a "train flag" (a flag of `reproduce` and
# `sweep`, derived from the field like the flags of `train`, and a key of their --config file).
# "evaluate": a grid's report compares eval-set metrics, so its runs always evaluate.
_GRID_FIELDS = {"output", "model", "method", "ratio", "seed", "overwrite", "evaluate"}

TRAIN_FLAGS = tuple(f.name for f in fields(TrainConfig) if f.name not in _GRID_FIELDS)

CLAIMS_DIR = ".claims"  # one lock file per run being worked on, so that several processes share a grid

RUNS_FILE = "runs.jsonl"

FAILURES_FILE = "failures.jsonl"


def parse_ratio(text: str | float) -> float:
    """``"1/16"``, ``"0.0625"`` or ``16`` -> a positive float (exact for fractions)."""
    try:
        value = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"ratio '{text}' is not a number; write it like 16, 0.0625 or 1/16") from None
    if not 0 < value < float("inf"):
        raise UserError(f"ratio '{text}' must be a positive finite number (lambda = lr_B / lr_A)")
    return value


def format_ratio(ratio: float) -> str:
    """Shortest exact text of a ratio: 16 -> "16", 1/16 -> "0.0625" (also filesystem-safe)."""
    ratio = float(ratio)
    return str(int(ratio)) if ratio.is_integer() else repr(ratio)


# A registry name or hub id part: letters, digits, '.', '_', '-', no "--", no '.'/'-' at either end
# (the rules of hub ids). Such names map to folders as they always did, without a hash.
_PLAIN_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")


def safe_name(name: str) -> str:
    """A model name, hub id or path as one folder name, different for different names.

    A registry name stays as it is and a hub id "org/name" becomes "org--name" (neither can hold
    "--", so these never meet). Any other name (a path, spaces, "--") is made safe the same way
    and gets "---" and 8 hex digits of the name's sha256, so two names that read alike after
    the cleaning ("a b" and "a_b", "org/name" and a folder named "org--name") never share a folder.
    """
    parts = name.split("/")
    if len(parts) <= 2 and all(_PLAIN_PART.fullmatch(p) and "--" not in p for p in parts):
        return "--".join(parts)
    clean = name.strip().strip("/")
    while clean.startswith("./"):
        clean = clean[2:]
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", clean.replace("/", "--")).lstrip(".") or "model"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{clean[:80]}---{digest}"


def base_method(method: str) -> str:
    """The single-learning-rate method an ``-plus`` method reduces to at ratio 1."""
    return get_method(method).family


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    model: str
    method: str
    ratio: float
    seed: int
    flags: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    name: str | None = None  # the run folder's name instead of <model>/<method>-r<ratio>-s<seed>

    @property
    def key(self) -> str:
        """Stable identity in ``runs.jsonl``: ``{model}/{method}-r{ratio}-s{seed}``."""
        return f"{self.model}/{self.method}-r{format_ratio(self.ratio)}-s{self.seed}"

    @property
    def folder(self) -> str:
        """Run folder below ``<output>/runs`` (posix form); ``name`` if the spec has one."""
        if self.name is not None:
            return self.name
        return f"{safe_name(self.model)}/{self.method}-r{format_ratio(self.ratio)}-s{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.model} {self.method} r={format_ratio(self.ratio)} seed {self.seed}"

    def config(self, run_dir: str | Path) -> TrainConfig:
        takes_ratio = METHODS[self.method].takes_ratio
        return TrainConfig(
            output=str(run_dir),
            model=self.model,
            method=self.method,
            ratio=self.ratio if takes_ratio else None,
            seed=self.seed,
            overwrite=True,  # only ever used on a folder without results.json: a crashed run
            **self.flags,
        )


@dataclass
class GridSpec:
    """models x arms x seeds with shared train flags.

    ``methods`` lists the methods to run; an ``-plus`` method gets one arm per ratio, and a
    ratio of 1 means its single-rate base method (OLoRA), so the baseline is never duplicated.
    """

    models: Sequence[str]
    ratios: Sequence[float] = DEFAULT_RATIOS
    seeds: Sequence[int] | int = DEFAULT_SEEDS
    methods: Sequence[str] = (BASELINE_METHOD, PLUS_METHOD)
    flags: dict[str, Any] = field(default_factory=dict)
    track_seeds: Sequence[int] = (0,)  # a "track_dynamics" flag applies to these seeds' runs only

    def arms(self) -> list[tuple[str, float]]:
        """(method, ratio) pairs: single-rate methods first, then ascending ratio."""
        arms: set[tuple[str, float]] = set()
        for method in self.methods:
            if not get_method(method).takes_ratio:
                arms.add((method, 1.0))
                continue
            for ratio in self.ratios:
                ratio = parse_ratio(ratio)
                arms.add((base_method(method), 1.0) if ratio == 1 else (method, ratio))
        order = list(METHODS)
        return sorted(arms, key=lambda a: (a[1] != 1.0, order.index(base_method(a[0])), a[1], a[0]))

    def seed_list(self) -> list[int]:
        if isinstance(self.seeds, int):
            if self.seeds < 1:
                raise UserError(f"--seeds must be at least 1, got {self.seeds}")
            return list(range(self.seeds))
        seeds = list(dict.fromkeys(int(s) for s in self.seeds))
        if not seeds:
            raise UserError("no seeds given; pass --seeds N (N >= 1)")
        return seeds

    def expand(self) -> list[RunSpec]:
        """All runs, ordered model, then seed, then arm.

        Seed-major order means an interrupted grid already holds complete paired comparisons
        (every arm of seed 0) instead of all seeds of one arm.
        """
        models = list(dict.fromkeys(self.models))
        if not models:
            raise UserError("no models given; pass --models NAME [NAME ...]")
        unknown = sorted(set(self.flags) - set(TRAIN_FLAGS))
        if unknown:
            raise UserError(f"unknown train flag(s) {', '.join(unknown)}; known: {', '.join(TRAIN_FLAGS)}")
        arms = self.arms()
        if not arms:
            raise UserError("the grid is empty: give --methods and --ratios")
        flags = dict(self.flags)
        track = flags.pop("track_dynamics", None)
        return [
            RunSpec(model, method, ratio, seed,
                    {**flags, "track_dynamics": track} if track and seed in self.track_seeds else dict(flags))
            for model in models
            for seed in self.seed_list()
            for method, ratio in arms
        ]


def expand_grid(
    models: Sequence[str],
    methods: Sequence[str] = (BASELINE_METHOD, PLUS_METHOD),
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seeds: Sequence[int] | int = DEFAULT_SEEDS,
    **train_flags: Any,
) -> list[RunSpec]:
    """The runs of a grid; ``seeds`` is a count (seeds 0..N-1) or a list of seeds."""
    return GridSpec(models=models, ratios=ratios, seeds=seeds, methods=methods, flags=train_flags).expand()


PAPER_HPARAMS = {"rank": 32, "alpha": 16, "lr": 3e-4, "epochs": 1}  # as stated in the paper


@dataclass(frozen=True)
class Preset:
    """A named grid: the models and train flags of one scale of the reproduction."""

    name: str
    description: str
    models: tuple[str, ...]
    flags: dict[str, Any]
    seeds: int = DEFAULT_SEEDS


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # Sized to finish in under 15 minutes on 2 CPU cores: 2 seeds, responses cut at 32 tokens.
        Preset("quick", "smoke test: smallest model, small data, 2 seeds", ("smollm2-135m",),
               {**PAPER_HPARAMS, "n_train": 200, "n_eval": 100, "max_new_tokens": 32}, seeds=2),
        Preset("local", "two small models at the paper's data sizes (CPU-feasible)",
               ("smollm2-135m", "gemma3-270m"),
               {**PAPER_HPARAMS, "n_train": 1000, "n_eval": 500, "max_new_tokens": 128}),
        Preset("paper", "the paper's three models (hub downloads, needs a GPU)",
               ("tinyllama-1.1b", "opt-1.3b", "gemma-2b"),
               {**PAPER_HPARAMS, "n_train": 1000, "n_eval": 500, "max_new_tokens": 128}),
    ]
}


def preset_grid(
    name: str,
    models: Sequence[str] | None = None,
    ratios: Sequence[float] | None = None,
    seeds: Sequence[int] | int | None = None,
    **overrides: Any,
) -> GridSpec:
    """The grid of a preset, with optional model/ratio/seed/train-flag overrides."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}': choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return GridSpec(
        models=tuple(models) if models else preset.models,
        ratios=tuple(ratios) if ratios else DEFAULT_RATIOS,
        seeds=preset.seeds if seeds is None else seeds,
        methods=(BASELINE_METHOD, PLUS_METHOD),
        flags={**preset.flags, **overrides},
    )


@dataclass
class GridOutcome:
    """What :func:`run_grid` did, by run key."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # claimed by another process on the same grid

    @property
    def ok(self) -> bool:
        return not self.failed


def _load_results(path: Path) -> dict | None:
    """A run's results.json, or None if it is missing (or unreadable: then the run is redone)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RESULT_NEUTRAL_FLAGS}


def _check_existing(spec: RunSpec, results: dict, data_hashes: dict[str, str | None] | None = None) -> None:
    """Refuse to count a finished run made with other settings (or another version of the data
    file: ``data_hashes`` maps each data argument to its file's sha256) as part of this grid."""
    stored = results.get("config")
    if not isinstance(stored, dict):
        return
    data = stored.get("data")
    now_hash = (data_hashes or {}).get(data)
    then_hash = (results.get("data") or {}).get("sha256") if isinstance(results.get("data"), dict) else None
    if now_hash and then_hash and now_hash != then_hash:
        raise UserError(
            f"run {spec.key} already finished on another version of {data} (sha256 {then_hash[:12]}... there, "
            f"{now_hash[:12]}... now); use another --output, or delete that run folder to redo it"
        )
    wanted = _comparable(asdict(spec.config("")))
    stored = _comparable(stored)
    differ = sorted(k for k in wanted if k in stored and stored[k] != wanted[k])
    if differ:
        detail = ", ".join(f"{k}: {stored[k]!r} there, {wanted[k]!r} now" for k in differ)
        raise UserError(
            f"run {spec.key} already finished with other settings ({detail}); "
            "use another --output, or delete that run folder to redo it"
        )


def run_row(spec: RunSpec, results: dict, run_dir: str, wall_seconds: float | None = None) -> dict:
    """The ``runs.jsonl`` line of a finished run: everything the report needs."""
    timings = dict(results.get("timings_seconds") or {})
    if wall_seconds is not None:
        timings["wall"] = wall_seconds
    mode = (results.get("evaluation") or {}).get("metrics_mode") or (results.get("config") or {}).get("metrics_mode")
    return {
        "key": spec.key,
        "model": spec.model,
        "method": spec.method,
        "ratio": spec.ratio,
        "seed": spec.seed,
        "metrics": results["metrics"],
        "metrics_mode": mode,
        "run_dir": run_dir,
        "flags": dict(spec.flags),
        "timings": timings,
    }


def _record(runs_file: Path, row: dict, known: set[str], replace: bool = True) -> None:
    """Add a row, or replace the row of the same key (a run folder deleted and redone) unless
    ``replace`` is False (a finished run found on disk: another process may have recorded it, with
    its timings).

    Under a lock (in the grid's claims folder), reading it afresh: several processes may work on one grid."""
    with waiting_lock(runs_file.parent / CLAIMS_DIR / f"{runs_file.name}.lock"):
        rows = read_runs(runs_file)
        known.add(row["key"])
        if all(r.get("key") != row["key"] for r in rows):
            append_jsonl_atomic(runs_file, row)
            return
        if not replace:
            return
        rows = [row if r.get("key") == row["key"] else r for r in rows]
        write_text_atomic(runs_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _reuse_finished(spec: RunSpec, reuse: Sequence[Path], target: Path,
                    data_hashes: dict[str, str | None] | None = None) -> dict | None:
    """Copy a finished run with the same key and settings from another grid folder, if any.

    So a sweep can share the runs it has in common with ``reproduce`` instead of training them
    again. The copy is made beside the target and renamed into place, so it appears whole.
    """
    for other in reuse:
        source = Path(other) / "runs" / spec.folder
        results = _load_results(source / "results.json")
        if results is None:
            continue
        try:
            _check_existing(spec, results, data_hashes)
        except UserError:
            continue  # same key, other settings or data: not the same run
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, partial, ignore=shutil.ignore_patterns("checkpoints"))
        partial.rename(target)
        return results
    return None


def run_grid(
    specs: Sequence[RunSpec],
    output_dir: str | Path,
    log: Callable[[str], None] = print,
    reuse: Sequence[str | Path] = (),
    runs_dir: str = "runs",
) -> GridOutcome:
    """Run every spec not yet complete into ``output_dir/<runs_dir>/<folder>`` (``runs_dir`` "": right
    in ``output_dir``).

    Several processes may run the same grid at once (the same command started N times): each run
    is claimed by one of them (:func:`claim_path`, a lock the kernel drops with its process), the
    others pass it over (``outcome.elsewhere``), and a run finished by another process meanwhile is
    recorded, not redone.

    A finished run with the same settings in one of the ``reuse`` grid folders is copied instead.

    A failing run is logged, recorded in ``failures.jsonl`` and skipped; the grid goes on.
    Ctrl-C stops the grid; the interrupted run has no results.json and is redone next time.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a folder")
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise UserError("the grid lists a run twice")
    folders: dict[str, str] = {}
    for spec in specs:  # case-insensitive file systems fold "Org/M" and "org/m" into one folder
        other = folders.setdefault(spec.folder.casefold(), spec.model)
        if other != spec.model:
            raise UserError(f"models '{other}' and '{spec.model}' would share the run folder "
                            f"{runs_dir}/{safe_name(spec.model)}; name each model one way only")
    for spec in specs:  # every config checked before the first (long) run starts
        spec.config(out).validate()
    data_hashes: dict[str, str | None] = {}
    for data in dict.fromkeys(spec.config(out).data for spec in specs):
        path = local_data_file(data)  # a missing data file fails the grid once, not every run
        data_hashes[data] = sha256_file(path) if path is not None else None
    for model in dict.fromkeys(spec.model for spec in specs):
        resolve_model(model)  # an unknown model name fails the grid once, before the first run
    existing = {s.key: _load_results(out / runs_dir / s.folder / "results.json") for s in specs}
    for spec in specs:
        if existing[spec.key] is not None:
            _check_existing(spec, existing[spec.key], data_hashes)

    out.mkdir(parents=True, exist_ok=True)
    runs_file, failures_file = out / RUNS_FILE, out / FAILURES_FILE
    known = {r.get("key") for r in read_runs(runs_file)}
    outcome = GridOutcome()
    total = len(specs)
    for i, spec in enumerate(specs, start=1):
        prefix = f"[{i}/{total}] {spec.label}"
        rel = (Path(runs_dir) / spec.folder).as_posix()
        with _claim(out, rel, prefix, spec.key, outcome, log) as mine:
            if not mine:
                continue
            _run_claimed(spec, rel, out, prefix, existing[spec.key], reuse, data_hashes, runs_file, failures_file,
                         known, outcome, log)
    log(
        f"{len(outcome.done)} run(s) done, {len(outcome.skipped)} already complete, "
        f"{len(outcome.failed)} failed" + (f" (see {failures_file})" if outcome.failed else "")
        + (f", {len(outcome.elsewhere)} running in another process" if outcome.elsewhere else "")
    )
    return outcome


@contextlib.contextmanager
def _claim(out: Path, rel: str, prefix: str, key: str, outcome: GridOutcome, log: Callable[[str], None]):
    """Claim the run folder ``rel`` for this process (:func:`claim_path`); yields whether it is ours, and
    logs and counts (``outcome.elsewhere``) a run that another process holds."""
    with shared_work_claim(claim_path(out, rel)) as mine:
        if not mine:
            log(f"{prefix} ... running in another process; passed over")
            outcome.elsewhere.append(key)
        yield mine


def claim_path(output_dir: str | Path, rel: str) -> Path:
    """The lock file by which one process claims the run folder ``rel`` of a grid (:func:`run_grid`)."""
    return Path(output_dir) / CLAIMS_DIR / f"{hashlib.sha256(rel.encode()).hexdigest()[:24]}.lock"


def _run_claimed(spec: RunSpec, rel: str, out: Path, prefix: str, results: dict | None, reuse: Sequence[str | Path],
                 data_hashes: dict, runs_file: Path, failures_file: Path, known: set[str], outcome: GridOutcome,
                 log: Callable[[str], None]) -> None:
    """One run of :func:`run_grid`, claimed by this process: recorded if finished (``results``, or by
    another process on the grid since it started), else copied from a ``reuse`` grid, else trained."""
    if results is None:
        results = _load_results(out / rel / "results.json")
        if results is not None:
            _check_existing(spec, results, data_hashes)
    if results is not None:
        if spec.key not in known:  # finished, but its line not seen yet (its process died, or runs beside us)
            _record(runs_file, run_row(spec, results, rel), known, replace=False)
        log(f"{prefix} ... already done (eval_loss {results['metrics']['eval_loss']:.4f})")
        outcome.skipped.append(spec.key)
        return
    copied = _reuse_finished(spec, [Path(r) for r in reuse], out / rel, data_hashes)
    if copied is not None:
        _record(runs_file, run_row(spec, copied, rel), known)
        log(f"{prefix} ... copied from a finished run (eval_loss {copied['metrics']['eval_loss']:.4f})")
        outcome.skipped.append(spec.key)
        return
    log(f"{prefix} ...")
    start = time.perf_counter()
    try:
        results = train(spec.config(out / rel))
    except Exception as exc:  # one broken run must not cost the rest of the grid
        seconds = time.perf_counter() - start
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        log(f"{prefix} ... FAILED after {seconds:.0f} s: {message}")
        append_jsonl_atomic(failures_file, {
            "key": spec.key, "model": spec.model, "method": spec.method, "ratio": spec.ratio,
            "seed": spec.seed, "run_dir": rel, "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(), "seconds": seconds,
        })
        outcome.failed.append(spec.key)
        return
    seconds = time.perf_counter() - start
    _record(runs_file, run_row(spec, results, rel, seconds), known)
    log(f"{prefix} ... done (eval_loss {results['metrics']['eval_loss']:.4f}, {seconds:.0f} s)")
    outcome.done.append(spec.key)


def rescore_grid(
    source: str | Path,
    output_dir: str | Path,
    metrics_mode: str,
    seeds: Sequence[int] | None = None,
    log: Callable[[str], None] = print,
) -> GridOutcome:
    """Score the saved adapters of a grid again in another metrics mode, without training.

    Each run of ``source/runs.jsonl`` (only ``seeds`` if given) is re-evaluated with
    ``oloraplus evaluate`` semantics (same split, same model) into ``output_dir/runs/<folder>``,
    and gets its line in ``output_dir/runs.jsonl``; resumable like :func:`run_grid`, and shared
    like it: several processes on one ``output_dir`` each claim a run before scoring it.
    """
    from oloraplus.training.recipe import evaluate_adapter

    source, out = Path(source), Path(output_dir)
    rows = [r for r in read_runs(source / RUNS_FILE) if seeds is None or r.get("seed") in set(seeds)]
    if not rows:
        raise UserError(f"{source / RUNS_FILE} lists no finished run to rescore")
    out.mkdir(parents=True, exist_ok=True)
    runs_file = out / RUNS_FILE
    known = {r.get("key") for r in read_runs(runs_file)}
    outcome = GridOutcome()
    for i, row in enumerate(sorted(rows, key=lambda r: r["key"]), start=1):
        spec = RunSpec(row["model"], row["method"], row["ratio"], row["seed"],
                       {**row.get("flags", {}), "metrics_mode": metrics_mode})
        prefix, rel = f"[{i}/{len(rows)}] {spec.label} ({metrics_mode})", f"runs/{spec.folder}"
        with _claim(out, rel, prefix, spec.key, outcome, log) as mine:
            if not mine:
                continue
            results = _load_results(out / rel / "results.json")  # read under the claim: maybe finished elsewhere
            if results is None:
                log(f"{prefix} ...")
                try:
                    results = evaluate_adapter(spec.config(out / rel), str(source / row["run_dir"] / "adapter"))
                except Exception as exc:  # like run_grid: one broken run does not stop the rest
                    log(f"{prefix} ... FAILED: {type(exc).__name__}: {exc}".splitlines()[0])
                    outcome.failed.append(spec.key)
                    continue
                outcome.done.append(spec.key)
            else:
                outcome.skipped.append(spec.key)
                if spec.key in known:
                    continue
            _record(runs_file, run_row(spec, results, rel), known)
    return outcome


def run_and_report(
    specs: Sequence[RunSpec], output_dir: str | Path, log: Callable[[str], None] = print, reuse: Sequence[str | Path] = ()
) -> GridOutcome:
    """Run the grid, then (re)build the report in the same folder from its ``runs.jsonl``.

    The report is built even when some runs failed, so finished work is always summarised.
    """
    from oloraplus.experiments.report import build_report

    outcome = run_grid(specs, output_dir, log=log, reuse=reuse)
    runs_file = Path(output_dir) / RUNS_FILE
    if read_runs(runs_file):
        files = build_report(runs_file, output_dir)
        log(f"wrote {files.markdown}")
    return outcome
