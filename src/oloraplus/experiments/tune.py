"""Hyper-parameter search with Optuna (``oloraplus tune``).

One Optuna study per (model, method), named ``<study-name>.<model>.<method>``, so every method gets
the same trial budget and its own search space: the learning rate on a log range, lambda (the
ratio) on a log range for the ``-plus`` methods, and optionally the dropout. The objective is the
validation loss (``--n-val`` records carved from the training records, ``metrics.val_loss``),
never the eval set; the trials skip the eval set altogether (``--no-evaluate``). A trial whose
intermediate validation losses (``--eval-steps``) are worse than the median of earlier trials at
the same step is pruned (Optuna's ``MedianPruner``); a trial whose training loss diverges (NaN or
infinite) counts as pruned too, with the note ``diverged``.

The study lives in its storage (``--storage``: an SQLite file, a PostgreSQL/MySQL URL shared by
several machines, or ``journal:FILE``, Optuna's journal file), and the storage is the whole state:
running the same command again resumes, and any number of processes or machines work on one study
at once. ``--workers N`` runs N worker processes here, each with ``cores // N`` compute threads.

The budget: ``--trials`` finished (COMPLETE or PRUNED) trials per method. A worker starts a trial
only while finished + running trials are below it; a trial that started over it anyway (two
workers deciding at the same moment) is marked FAIL at once with the user attribute
``over_budget``. A killed worker's trial stays RUNNING in the storage: with a database storage
each trial records a heartbeat, and a trial whose heartbeat is older than the grace period is
marked FAIL by the next worker. A worker serves the methods in their order and passes over a
method whose rest of the budget is running elsewhere; with nothing left to start anywhere it waits
for the running trials, so that it can replace a dead one. The journal file has no heartbeat:
after a killed worker, ``--fail-running`` (with no other worker running) marks its trials FAIL. Failed trials never count.

A study remembers its settings (the searched ranges and every train flag) and refuses a command
with other ones. One change is allowed when asked for: ``--widen`` accepts searched ranges that
each contain the study's (say ``--lr-range 1e-6 1e-1`` after ``1e-6 1e-2``, when the best setting
lies near an end), so that the next trials search the wider range while the finished ones keep
counting; each widening is recorded in the study (user attribute ``widened``: the old and new
ranges and after how many finished trials) and in ``best.json``. From the first trial after the
widening on, the widened parameter is drawn on its own over its new range (univariate TPE, from all
trials' values), the others jointly as before (the sampler of ``_sampler_and_pruner`` says why).

Outputs in ``--output``: ``best.json`` (per method: the best trial's parameters and validation
loss), ``trials.csv`` (one row per trial), ``figure_val_loss_vs_lr.png`` and, per ``-plus`` method,
``figure_heatmap_<method>.png`` (best validation loss over log lr x log lambda), per method with a
complete trial ``best_<method>.yaml`` (a ``train --config`` file of its best setting, trained as the
final runs are), and the trials' run folders under ``trials/<method>/<number>``.

Final runs (``--final-seeds N``, the plan of ``results/tuned/PLAN.md``): after the search (the same
command first resumes each study to its budget), each method's best setting (the COMPLETE trial of
lowest validation loss, the earliest on a tie) is trained with seeds s = 0..N-1, each with
``--data-seed D + s`` (D: the study's data seed), on all training records (``--n-val 0``, no
``--eval-steps``) and evaluated on the eval records (generation metrics), into
``final/<method>-s<s>/`` (and a line each in ``final/runs.jsonl``; ``final/trials.csv``: the trials of
every method's study in the storage, for the report); every other setting is the study's. The runs go through
:func:`oloraplus.experiments.grid.run_grid`, so a finished run is skipped (and one finished with
another setting, say after more trials moved the best, is refused), then ``report.md`` and
``comparisons.csv`` are written from them (:mod:`oloraplus.experiments.tuned_report`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from oloraplus.data.records import data_sha256
from oloraplus.errors import UserError
from oloraplus.experiments.grid import GridOutcome, RunSpec, run_grid, safe_name
from oloraplus.experiments.tune_figures import figure_heatmap, figure_val_loss_vs_lr
from oloraplus.experiments.tuned_report import FINAL_DIR, TRIALS_FILE, best_trial, build_tuned_report
from oloraplus.files import write_json_atomic, write_text_atomic
from oloraplus.method.registry import METHODS, get_method
from oloraplus.method.trainer import NonFiniteLossError
from oloraplus.training.config import RESULT_NEUTRAL_FLAGS, TrainConfig, config_yaml
from oloraplus.training.recipe import train

INSTALL_HINT = "oloraplus tune needs Optuna: pip install 'oloraplus[tune]' (or pip install optuna)"

# TrainConfig fields tune sets itself, and those of the eval set's evaluation (trials skip it); every
# other field is a train flag of `oloraplus tune`.
TUNE_FIELDS = {"output", "model", "method", "lr", "ratio", "overwrite", "resume", "resume_weights_only",
               "save_steps", "evaluate", "metrics_mode", "max_new_tokens", "generation_batch_size"}

TUNE_TRAIN_FLAGS = tuple(f.name for f in fields(TrainConfig) if f.name not in TUNE_FIELDS)

DEFAULT_N_VAL = 100

# SQLAlchemy dialects Optuna's RDBStorage runs on.
_DATABASES = ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")

CSV_COLUMNS = ("method", "study", "number", "state", "lr", "ratio", "dropout", "val_loss", "last_step",
               "duration_seconds", "note", "output")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # oloraplus prints one line per trial itself
    return optuna


@dataclass
class TuneSpec:
    """An ``oloraplus tune`` command: what to search, where the study lives, how many trials."""

    model: str
    methods: list[str]
    trials: int  # finished (COMPLETE or PRUNED) trials per method
    output: str
    storage: str | None = None  # default: sqlite:///OUTPUT/optuna.db
    study_name: str = "oloraplus"
    workers: int = 1
    lr_range: tuple[float, float] = (1e-5, 1e-2)
    ratio_range: tuple[float, float] = (1 / 16, 16.0)
    dropout_range: tuple[float, float] | None = None  # None: not tuned (the dropout flag is used)
    prune: bool = True
    heartbeat: float = 60.0  # seconds between a running trial's heartbeats (database storages)
    fail_running: bool = False
    widen: bool = False  # accept searched ranges that contain the study's (recorded in its "widened")
    flags: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields, e.g. n_val, eval_steps, max_steps
    final_seeds: int = 0  # > 0: then train each method's best setting with seeds 0..N-1 into OUTPUT/final

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.output).resolve() / 'optuna.db'}"

    def study(self, method: str) -> str:
        return f"{self.study_name}.{safe_name(self.model)}.{method}"

    def trial_config(self, method: str, lr: float, ratio: float | None, dropout: float | None,
                     output: str) -> TrainConfig:
        # A trial's adapter is never served: no standard-LoRA export beside it (result-neutral).
        flags = {"n_val": DEFAULT_N_VAL, "progress": False, "export": False, **self.flags}
        if dropout is not None:
            flags["dropout"] = dropout
        return TrainConfig(output=output, model=self.model, method=method, lr=lr, ratio=ratio, overwrite=True,
                           evaluate=False, **flags)

    def validate(self) -> None:
        """Every setting, checked before any storage is opened or model loaded."""
        if not self.methods:
            raise UserError("give at least one method to tune (--methods)")
        for method in self.methods:
            get_method(method)
        if len(set(self.methods)) != len(self.methods):
            raise UserError("--methods names a method twice")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 0:
            raise UserError(f"--trials must be a whole number >= 0 (trials per method; 0: run none, write the "
                            f"outputs from the study as it is), got {self.trials!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise UserError(f"--workers must be a positive whole number, got {self.workers!r}")
        cores = available_cores()
        if self.workers > cores:
            raise UserError(f"--workers {self.workers} is more than the {cores} CPU cores here; each worker needs "
                            "at least one (oversubscribed PyTorch processes slow down many times over)")
        for name, (low, high) in (("--lr-range", self.lr_range), ("--ratio-range", self.ratio_range)):
            if not (0 < low <= high < math.inf):
                raise UserError(f"{name} LOW HIGH must be positive numbers with LOW <= HIGH, got {low} {high}")
        if self.dropout_range is not None:
            low, high = self.dropout_range
            if not 0 <= low <= high < 1:
                raise UserError(f"--dropout-range LOW HIGH must satisfy 0 <= LOW <= HIGH < 1, got {low} {high}")
            if "dropout" in self.flags:
                raise UserError("--dropout fixes the dropout and --tune-dropout searches it; pass only one")
        if isinstance(self.final_seeds, bool) or not isinstance(self.final_seeds, int) or self.final_seeds < 0:
            raise UserError(f"--final-seeds must be a whole number >= 0 (0: no final runs), got {self.final_seeds!r}")
        if not self.heartbeat > 0:
            raise UserError(f"--heartbeat must be a positive number of seconds, got {self.heartbeat}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.study_name):
            raise UserError(f"--study-name '{self.study_name}': use letters, digits, '.', '_' and '-'")
        unknown = sorted(set(self.flags) - set(TUNE_TRAIN_FLAGS))
        if unknown:
            raise UserError(f"tune sets {', '.join(unknown)} itself (the searched and per-trial settings)")
        if self.flags.get("n_val", DEFAULT_N_VAL) == 0:
            raise UserError("tune minimises the validation loss: --n-val must be at least 1 (records carved from "
                            "the training records)")
        for method in self.methods:  # every train flag, as each trial will get them
            ratio = self.ratio_range[0] if get_method(method).takes_ratio else None
            self.trial_config(method, self.lr_range[0], ratio, None, str(Path(self.output) / "trials")).validate()
            if self.final_seeds:  # ... and as each final run will
                params = {"lr": self.lr_range[0], "ratio": ratio}
                self.final_spec(method, params, 0).config(Path(self.output) / FINAL_DIR).validate()

    def final_spec(self, method: str, params: dict, seed: int) -> RunSpec:
        """The final run of ``method`` at the trial parameters ``params`` (lr, and ratio, dropout when
        searched) with training seed ``seed`` and data seed (the study's) + ``seed``: every other setting as
        in the trials, but trained on all training records (no validation split) and evaluated."""
        flags = {"progress": False, **{k: v for k, v in self.flags.items() if k not in ("seed", "n_val",
                                                                                          "eval_steps")}}
        flags.update(lr=float(params["lr"]), n_val=0, data_seed=self.flags.get("data_seed", _default("data_seed"))
                     + seed)
        if params.get("dropout") is not None:
            flags["dropout"] = float(params["dropout"])
        takes_ratio = get_method(method).takes_ratio
        return RunSpec(self.model, method, float(params["ratio"]) if takes_ratio else 1.0, seed, flags,
                       name=f"{method}-s{seed}")

    def settings(self, method: str) -> dict:
        """What a study's trials depend on, stored with the study and compared on resume."""
        config = asdict(self.trial_config(method, 1.0, None, None, ""))
        for name in ("lr", "ratio", "output", "overwrite") + tuple(RESULT_NEUTRAL_FLAGS):
            config.pop(name, None)
        digest = data_sha256(config["data"])  # the file's content, wherever each machine keeps it
        if digest is not None:
            config["data"] = f"sha256:{digest}"
        return {"method": method, "lr_range": list(self.lr_range),
                "ratio_range": list(self.ratio_range) if get_method(method).takes_ratio else None,
                "dropout_range": list(self.dropout_range) if self.dropout_range else None, "train": config}


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def open_storage(url: str, heartbeat: float = 60.0):
    """The Optuna storage of ``url``; a bad URL or an unreachable database is one :class:`UserError`.

    ``journal:FILE`` (or a file ending in ``.log``/``.journal``) is Optuna's journal file; anything
    else must be a database URL (``sqlite:///FILE``, ``postgresql://...``, ``mysql://...``), whose
    trials record a heartbeat every ``heartbeat`` seconds (a trial silent for twice that is failed).
    """
    optuna = _optuna()
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    url = str(url).strip()
    journal = url[len("journal:"):] if url.startswith("journal:") else None
    if journal is None and "://" not in url and url.endswith((".log", ".journal")):
        journal = url
    if journal is not None:
        if not journal:
            raise UserError("--storage journal:FILE needs a file name")
        try:
            Path(journal).resolve().parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(journal))
        except Exception as exc:
            raise UserError(f"cannot open --storage {url}: {_first_line(exc)}") from None
    scheme = url.partition("://")[0].split("+")[0].lower() if "://" in url else ""
    if scheme not in _DATABASES:
        raise UserError(f"--storage '{url}' is not a storage URL: give sqlite:///FILE, postgresql://USER@HOST/DB, "
                        "mysql://USER@HOST/DB or journal:FILE")
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if scheme == "sqlite" else {}
    try:
        with warnings.catch_warnings():  # heartbeat is "experimental" in some Optuna versions
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, heartbeat_interval=max(1, round(heartbeat)),
                              grace_period=max(2, round(2 * heartbeat)), **kwargs)
    except Exception as exc:  # a bad URL, a missing driver, an unreachable server, an unwritable file
        raise UserError(f"cannot open --storage {url}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def has_heartbeat(storage) -> bool:
    from optuna.storages import RDBStorage

    return isinstance(storage, RDBStorage)


def search_space(spec: TuneSpec, takes_ratio: bool = True) -> dict:
    """The distributions a trial draws its parameters from, in the order it draws them: lr, then ratio
    (``takes_ratio``: the ``-plus`` methods), then dropout when it is searched."""
    optuna = _optuna()
    space = {"lr": optuna.distributions.FloatDistribution(*spec.lr_range, log=True)}
    if takes_ratio:
        space["ratio"] = optuna.distributions.FloatDistribution(*spec.ratio_range, log=True)
    if spec.dropout_range:
        space["dropout"] = optuna.distributions.FloatDistribution(*spec.dropout_range)
    return space


def _sampler_and_pruner(spec: TuneSpec):
    optuna = _optuna()
    current = search_space(spec)

    class TPEOnTheSearchedRanges(optuna.samplers.TPESampler):
        """Optuna's multivariate TPE, whose joint part leaves out a parameter that earlier trials drew
        from another range than ``spec``'s.

        Why: after ``--widen``, Optuna's joint search space (the parameters whose distribution is the
        same in every finished trial) still holds the *old* range until a trial of the new range has
        finished, and a suggested value is taken from the joint sample whenever the new range contains
        it, so the first trial after a widening would search the old range only. Left out of the joint
        part, the widened parameter is drawn on its own (univariate TPE over the new range, from every
        trial's value), from the first trial after the widening on."""

        def infer_relative_search_space(self, study, trial):
            joint = super().infer_relative_search_space(study, trial)
            return {name: dist for name, dist in joint.items() if current.get(name, dist) == dist}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # No seed: workers (and resumed workers) must not draw the same "random" start points.
        sampler = TPEOnTheSearchedRanges(multivariate=True, constant_liar=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if spec.prune else optuna.pruners.NopPruner()
    return sampler, pruner


def prepare_studies(spec: TuneSpec, storage) -> None:
    """Create (or check) each method's study: a study made with other settings is a :class:`UserError`."""
    optuna = _optuna()
    for method in spec.methods:
        study = optuna.create_study(storage=storage, study_name=spec.study(method), direction="minimize",
                                    load_if_exists=True)
        wanted = json.loads(json.dumps(spec.settings(method)))
        stored = study.user_attrs.get("settings")
        if stored is None:
            study.set_user_attr("settings", wanted)
            continue
        differ = _differences(stored, wanted)
        widening = _widening(stored, wanted) if differ else None
        if differ and not (spec.widen and widening):
            hint = " --widen to widen its searched ranges," if widening else ""
            raise UserError(f"study {spec.study(method)} in {spec.storage_url} was run with other settings "
                            f"({'; '.join(differ[:4])}); use the same flags to resume it,{hint} or another "
                            "--study-name")
        if differ:  # a widening, asked for: the study searches the wider ranges from its next trial on
            finished = sum(t.state in _counted(optuna) for t in study.get_trials(deepcopy=False))
            record = {"after_finished_trials": finished, "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      **widening}
            study.set_user_attr("widened", [*study.user_attrs.get("widened", []), record])
            # only the ranges change: the stored train settings stay as the trials ran them (an older
            # oloraplus resuming the study compares against them)
            study.set_user_attr("settings", {**stored, **{k: new for k, (_, new) in widening.items()}})
        if spec.fail_running:
            for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
                storage.set_trial_user_attr(trial._trial_id, "note", "failed by --fail-running")


def _differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b and not (key not in stored and prefix == "train." and b == _default(key)):
            # a train setting newer than the study, at its default: what the study's trials ran with
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


RANGES = ("lr_range", "ratio_range", "dropout_range")


def _widening(stored: dict, wanted: dict) -> dict | None:
    """``{"lr_range": [old, new], ...}`` when ``wanted`` differs from a study's ``stored`` settings only
    in searched ranges that each contain the stored one (a widening); None otherwise."""
    if _differences({k: v for k, v in stored.items() if k not in RANGES},
                    {k: v for k, v in wanted.items() if k not in RANGES}):
        return None
    changed = {k: [stored.get(k), wanted.get(k)] for k in RANGES if stored.get(k) != wanted.get(k)}
    for old, new in changed.values():
        if old is None or new is None or not (new[0] <= old[0] and old[1] <= new[1]):
            return None
    return changed or None


def _default(name: str):
    """The default of a TrainConfig field (None for a name it does not have)."""
    field_ = {f.name: f for f in fields(TrainConfig)}.get(name)
    return None if field_ is None else field_.default


class _OverBudget(Exception):
    """A trial started when the budget was already taken by others (two workers asked at once)."""


class PruningCallback(TrainerCallback):
    """Reports each validation loss (``on_evaluate``) to the Optuna trial; raises ``TrialPruned``
    when the pruner says so (before the last step: a finished trial keeps its value)."""

    def __init__(self, trial):
        self.trial = trial

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "val_loss" not in metrics:
            return
        self.trial.report(metrics["val_loss"], state.global_step)
        if state.global_step < state.max_steps and self.trial.should_prune():
            optuna = _optuna()
            raise optuna.TrialPruned(f"val_loss {metrics['val_loss']:.4f} at step {state.global_step}")


def _counted(optuna):
    return (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _objective(spec: TuneSpec, method: str, study, say):
    optuna = _optuna()
    space = search_space(spec, get_method(method).takes_ratio)

    def objective(trial) -> float:
        trial.set_user_attr("worker", _WORKER)  # first: a trial without it for long is a dead worker's
        ahead = [t for t in study.get_trials(deepcopy=False)
                 if t.number < trial.number and t.state != optuna.trial.TrialState.FAIL]
        if len(ahead) >= spec.trials:
            trial.set_user_attr("note", "over budget: started as the budget filled up; not run")
            raise _OverBudget()
        drawn = {name: trial.suggest_float(name, dist.low, dist.high, log=dist.log) for name, dist in space.items()}
        lr, ratio, dropout = drawn["lr"], drawn.get("ratio"), drawn.get("dropout")
        output = Path(spec.output) / "trials" / method / f"{trial.number:04d}"
        trial.set_user_attr("output", str(output))
        config = spec.trial_config(method, lr, ratio, dropout, str(output))
        try:
            results = train(config, callbacks=[PruningCallback(trial)])
        except optuna.TrialPruned:
            say(f"{method} trial {trial.number}: pruned ({_params_text(trial.params)})")
            raise
        except NonFiniteLossError as exc:  # a learning rate too high: the worst outcome, not a broken trial
            trial.set_user_attr("note", f"diverged: {str(exc).splitlines()[0]}")
            say(f"{method} trial {trial.number}: diverged, counted as pruned ({_params_text(trial.params)})")
            raise optuna.TrialPruned("diverged") from None
        value = results["metrics"]["val_loss"]
        if not math.isfinite(value):
            trial.set_user_attr("note", "diverged: non-finite validation loss")
            raise optuna.TrialPruned("diverged")
        trial.set_user_attr("last_step", results["training"]["steps"])
        say(f"{method} trial {trial.number}: val_loss {value:.4f} ({_params_text(trial.params)})")
        return value

    return objective


def _params_text(params: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in params.items())


_WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _fail_dead_workers_trials(study, grace_seconds: float, optuna) -> None:
    """FAIL the running trials whose worker is known to be dead, which heartbeats cannot tell.

    Optuna fails a trial whose heartbeat went stale, but a worker killed after the trial was created
    and before its first heartbeat leaves a trial with no heartbeat at all, RUNNING for ever. Each
    trial names its worker (host:pid) first thing; a trial here whose worker process is gone, or that
    named no worker within the grace period, is failed.
    """
    import datetime

    host = socket.gethostname()
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is None:
            dead = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > grace_seconds
        else:
            worker_host, _, pid = worker.rpartition(":")
            dead = worker_host == host and pid.isdigit() and not _alive(int(pid))
        if dead:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_worker(spec: TuneSpec, say=print) -> None:
    """Run trials of each method's study until every budget is finished (one worker; see the module doc).

    The methods are served in their order: the worker starts its next trial in the first method
    whose finished + running trials are below the budget. A method whose rest of the budget is
    taken by other workers' running trials is passed over, not waited for, so N workers on a study
    of several methods stay busy until the last trials; only when every unfinished method is in that
    state does the worker wait (with a database storage: one of those trials may be a dead worker's,
    failed by its heartbeat and then replaced).
    """
    optuna = _optuna()
    storage = open_storage(spec.storage_url, spec.heartbeat)
    if not spec.flags.get("progress", False):  # trials run without progress bars unless --progress
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    running_states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    studies = {}
    for method in spec.methods:
        sampler, pruner = _sampler_and_pruner(spec)  # a sampler keeps state of one study
        study = optuna.load_study(study_name=spec.study(method), storage=storage, sampler=sampler, pruner=pruner)
        studies[method] = (study, _objective(spec, method, study, say))
    waiting: set[str] = set()
    while True:
        started = pending = False
        for method, (study, objective) in studies.items():
            with warnings.catch_warnings():  # "experimental" in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a killed worker's trial: FAIL (database storages)
            _fail_dead_workers_trials(study, 2 * spec.heartbeat, optuna)
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in _counted(optuna) for t in trials)
            running = sum(t.state in running_states for t in trials)
            if finished >= spec.trials:
                continue
            if finished + running >= spec.trials:  # taken by running trials; one may be a dead worker's
                if has_heartbeat(storage):
                    pending = True
                    if method not in waiting:
                        say(f"{method}: the rest of the budget is running in other workers")
                        waiting.add(method)
                continue
            waiting.discard(method)
            study.optimize(objective, n_trials=1, catch=(_OverBudget,), gc_after_trial=True)
            started = True
            break  # look again from the first method: earlier methods are served first
        if not started:
            if not pending:
                return
            time.sleep(min(5.0, spec.heartbeat))


def tune(spec: TuneSpec, say=print) -> dict:
    """Run (or resume) the search and write the outputs; returns ``best.json``'s content."""
    spec.validate()
    Path(spec.output).mkdir(parents=True, exist_ok=True)
    storage = open_storage(spec.storage_url, spec.heartbeat)
    prepare_studies(spec, storage)
    if spec.trials > 0:  # with 0 nothing runs, not even the dead-worker check (it writes to the study)
        (run_worker if spec.workers == 1 else _run_worker_processes)(spec, say)
    return write_outputs(spec, storage)


def _run_worker_processes(spec: TuneSpec, say) -> None:
    """``spec.workers`` processes running :func:`run_worker`, the cores divided between them."""
    threads = max(1, available_cores() // spec.workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    payload = json.dumps({**asdict(spec), "workers": 1})
    say(f"{spec.workers} workers, {threads} compute thread(s) each")
    procs = [subprocess.Popen([sys.executable, "-m", "oloraplus.experiments.tune", payload, str(threads)], env=env)
             for _ in range(spec.workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # the workers got the same Ctrl-C: their trials are marked FAIL
        for p in procs:
            p.wait()
        raise
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        raise UserError(f"tune worker(s) {', '.join(f'{i} (exit {c})' for i, c in failed)} failed (their "
                        "error is above); run the command again to resume the study")


def _worker_main(argv: list[str]) -> int:
    """Entry of a worker process: ``python -m oloraplus.experiments.tune SPEC_JSON THREADS``."""
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, as in the CLI
    torch.set_num_threads(int(argv[1]))
    values = json.loads(argv[0])
    for name in RANGES:
        if values.get(name) is not None:
            values[name] = tuple(values[name])
    try:
        run_worker(TuneSpec(**values), say=lambda line: print(line, flush=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def trial_rows(spec: TuneSpec, storage) -> list[dict]:
    """One row per trial of every method's study (the ``trials.csv`` rows)."""
    optuna = _optuna()
    rows = []
    for method in spec.methods:
        study = optuna.load_study(study_name=spec.study(method), storage=storage)
        for t in study.get_trials(deepcopy=False):
            value = t.value if t.state == optuna.trial.TrialState.COMPLETE else None
            last_step = t.last_step if t.state == optuna.trial.TrialState.PRUNED else t.user_attrs.get("last_step")
            rows.append({
                "method": method, "study": study.study_name, "number": t.number, "state": t.state.name,
                "lr": t.params.get("lr"), "ratio": t.params.get("ratio"), "dropout": t.params.get("dropout"),
                "val_loss": value if value is not None else (t.intermediate_values.get(t.last_step)
                                                             if t.last_step is not None else None),
                "last_step": last_step,
                "duration_seconds": t.duration.total_seconds() if t.duration is not None else None,
                "note": t.user_attrs.get("note", ""), "output": t.user_attrs.get("output", ""),
            })
    return rows


def write_trials_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    write_text_atomic(path, buf.getvalue())


def stored_methods(spec: TuneSpec, storage) -> list[str]:
    """The methods (registry order) with a study of ``spec``'s study name and model in ``storage``, whichever
    command made them (the single-rate and ``-plus`` methods may be tuned by two commands)."""
    optuna = _optuna()
    names = set(optuna.study.get_all_study_names(storage))
    return [m for m in METHODS if spec.study(m) in names]


EDGE_FACTOR = 2.0  # results/tuned/PLAN.md's edge rule: within a factor 2 of an end of a log range


def near_edge(spec: TuneSpec, params: dict) -> list[str]:
    """The searched ranges whose end the best setting lies near: ``"--lr-range low"`` and the like.

    For the log ranges (lr, ratio) "near" is within a factor :data:`EDGE_FACTOR` of an end; for the
    dropout range, within a tenth of its width (its low end only when above 0). A best setting near
    an end means the optimum may lie outside the range: widen that side and run more trials.
    """
    ranges = {"lr": ("--lr-range", spec.lr_range), "ratio": ("--ratio-range", spec.ratio_range),
              "dropout": ("--dropout-range", spec.dropout_range)}
    found = []
    for key, value in params.items():
        flag, bounds = ranges[key]
        if bounds is None:  # dropout not tuned: a fixed value, no range
            continue
        low, high = bounds
        if key == "dropout":  # a best dropout near 0 is an answer, not a range too narrow
            margin = (high - low) / 10
            at_low, at_high = low > 0 and value <= low + margin, value >= high - margin
        else:
            at_low, at_high = value <= low * EDGE_FACTOR, value >= high / EDGE_FACTOR
        found += [f"{flag} low"] * at_low + [f"{flag} high"] * at_high
    return found


def write_outputs(spec: TuneSpec, storage) -> dict:
    """``best.json``, ``trials.csv``, the figures and ``best_<method>.yaml`` from the studies in ``storage``.

    ``best_<method>.yaml`` is a ``train --config`` file of the method's best setting as the final runs
    train it (seed 0: all training records, no validation split, evaluated on the eval records)."""
    out = Path(spec.output)
    rows = trial_rows(spec, storage)
    write_trials_csv(rows, out / "trials.csv")
    best = {"storage": _public_url(spec.storage_url), "model": spec.model, "objective": "val_loss", "methods": {}}
    for method in spec.methods:
        mine = [r for r in rows if r["method"] == method]
        complete = [r for r in mine if r["state"] == "COMPLETE"]
        entry = {"study": spec.study(method),
                 "trials": {s: sum(r["state"] == s for r in mine) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}}
        widened = _optuna().load_study(study_name=spec.study(method), storage=storage).user_attrs.get("widened")
        if widened:
            entry["widened"] = widened
        if complete:
            top = best_trial(complete)
            params = {k: top[k] for k in ("lr", "ratio", "dropout") if top[k] is not None}
            train_config = out / f"best_{method}.yaml"  # the best setting as the paper's protocol trains it
            run = spec.final_spec(method, params, seed=0).config(out / f"best_{method}")
            run = replace(run, overwrite=_default("overwrite"), progress=_default("progress"))  # a user's run
            write_text_atomic(train_config, config_yaml(run))
            entry.update(trial=top["number"], val_loss=top["val_loss"], params=params, output=top["output"],
                         near_edge=near_edge(spec, params), train_config=str(train_config))
        best["methods"][method] = entry
    write_json_atomic(out / "best.json", best)
    figure_val_loss_vs_lr(rows, spec.methods, out / "figure_val_loss_vs_lr.png")
    for method in spec.methods:
        path = out / f"figure_heatmap_{method}.png"
        if get_method(method).takes_ratio:
            figure_heatmap([r for r in rows if r["method"] == method and r["state"] == "COMPLETE"], method,
                           spec.lr_range, spec.ratio_range, path)
    return best


def run_final(spec: TuneSpec, storage=None, say=print) -> GridOutcome:
    """The final runs of ``spec.final_seeds`` seeds at each method's best trial (see the module doc), then
    the tuned report in ``spec.output``. A method without a COMPLETE trial is a :class:`UserError` before
    any run starts."""
    storage = storage if storage is not None else open_storage(spec.storage_url, spec.heartbeat)
    rows = trial_rows(spec, storage)
    specs = []
    for method in spec.methods:
        top = best_trial([r for r in rows if r["method"] == method])
        if top is None:
            raise UserError(f"{method} has no complete trial in study {spec.study(method)}: no best setting to "
                            "run the final runs with")
        params = {k: top[k] for k in ("lr", "ratio", "dropout") if top[k] is not None}
        say(f"{method}: final runs at trial {top['number']} ({_params_text(params)}; val_loss {top['val_loss']:.4f})")
        specs += [spec.final_spec(method, top, seed) for seed in range(spec.final_seeds)]
    specs.sort(key=lambda s: (s.seed, spec.methods.index(s.method)))  # seed-major: early seeds pair up first
    final = Path(spec.output) / FINAL_DIR
    outcome = run_grid(specs, final, log=say, runs_dir="")  # runs.jsonl there too
    running = [s for s in specs if s.key in outcome.elsewhere and not (final / s.folder / "results.json").is_file()]
    if running:  # the process that finishes the last of them writes the report
        say(f"{len(running)} final run(s) still running in another process ({', '.join(s.folder for s in running)}); "
            "that process writes the report when it finishes")
        return outcome
    # the trials of every method's study in the storage (OUTPUT/trials.csv has this command's methods only)
    every = replace(spec, methods=stored_methods(spec, storage))
    write_trials_csv(trial_rows(every, storage), final / TRIALS_FILE)
    files = build_tuned_report(spec.output)
    say(f"wrote {files.markdown}")
    say(f"wrote {files.csv}")
    return outcome


def _public_url(url: str) -> str:
    """The storage URL without a password."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
