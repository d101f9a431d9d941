"""Run folders and checkpoints: preparing ``--output``, finding the checkpoint ``--resume`` continues
from, and refusing to resume with flags that change the training."""

from __future__ import annotations

import functools
import json
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

from oloraplus.data.records import data_sha256
from oloraplus.errors import UserError, warn
from oloraplus.files import write_json_atomic
from oloraplus.outputs import RUN_MARKERS, claimed, commit_output, open_output, staging_folder
from oloraplus.training.config import RESULT_NEUTRAL_FLAGS, TrainConfig


def prepare_output(output: str, overwrite: bool, resume: bool = False, inputs: Iterable[str] = ()) -> Path:
    """Check and claim ``--output`` for this run; returns the folder to write into.

    Refuses to mix a new run into a folder that already holds something, and every unsafe output
    (see :mod:`oloraplus.outputs`: an input, the working folder, a cache, a path under a file,
    unwritable, ...). Takes the output's lock. A fresh run or ``--resume`` writes in place; an
    ``--overwrite`` run writes beside the old output (:func:`run_folder`) until
    :func:`finish_output` swaps it in, so a failed or killed run leaves the old output as it was.
    """
    return open_output(output, overwrite, resume, inputs=inputs, markers=RUN_MARKERS)


def run_folder(config: TrainConfig) -> Path:
    """The folder a run writes while it runs (what :func:`prepare_output` returned on rank 0)."""
    return staging_folder(config.output) if config.overwrite and not config.resume else Path(config.output)


def run_inputs(config: TrainConfig, *more: str) -> list[str]:
    """The local paths a run reads (the output may not be, hold or lie above any of them)."""
    return [config.data, config.model, *more]


def finish_output(output: str) -> Path:
    """Make the finished run the output (after its results.json) and release the lock."""
    return commit_output(output)


def releases_output(run: Callable) -> Callable:
    """Decorate ``run(config, ...)``: if it fails, the output it claimed is given up (the staged run
    removed, the old output left as it was, the lock released)."""

    @functools.wraps(run)
    def wrapper(config, *args, **kwargs):
        with claimed(config.output):
            return run(config, *args, **kwargs)

    return wrapper


CHECKPOINTS = "checkpoints"  # OUTPUT/checkpoints/checkpoint-N, written by the Trainer

RUN_CONFIG = "run_config.json"  # OUTPUT/checkpoints/run_config.json: the flags the checkpoints belong to


def resume_checkpoint(config: TrainConfig) -> str | None:
    """The checkpoint ``--resume`` continues from (None without --resume).

    The newest complete checkpoint (:func:`checkpoint_problem`): a process killed while saving,
    or a file truncated or damaged later, leaves one that is skipped with a warning, so the run
    falls back to the previous complete one. Without ``--resume-weights-only`` a checkpoint must
    hold the optimiser and scheduler state (an exact resume). Read-only, so every process of a
    distributed run can call it.
    """
    if not config.resume:
        return None
    out = Path(config.output)
    if (out / "results.json").exists():
        raise UserError(f"the run in {out} is already complete (results.json exists); use --overwrite to redo it")
    folder = out / CHECKPOINTS
    steps = []
    if folder.is_dir():
        steps = [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    weights_only = getattr(config, "resume_weights_only", False)
    skipped: list[str] = []
    for step in sorted(steps, reverse=True):
        checkpoint = folder / f"checkpoint-{step}"
        problem = checkpoint_problem(checkpoint, step, weights_only)
        if problem is not None:
            skipped.append(f"{checkpoint.name} {problem}")
            continue
        check_same_run(folder / RUN_CONFIG, config)
        for reason in skipped:
            warn(f"--resume: skipping {reason}; resuming from {checkpoint.name}")
        if weights_only and not _has_optimizer_state(checkpoint):
            warn(f"--resume-weights-only: {checkpoint.name} has no optimizer state; the optimizer and "
                 "learning-rate schedule start afresh (not an exact resume)")
        return str(checkpoint)
    detail = f" ({'; '.join(skipped)})" if skipped else " (runs write them with --save-steps N)"
    hint = ("; pass --resume-weights-only to continue from the weights with a fresh optimizer, or start "
            "the run again with --overwrite") if any(_OPTIMIZER_MISSING in s for s in skipped) and not weights_only \
        else "; start the run again with --overwrite"
    raise UserError(f"--resume: no complete checkpoint in {folder}{detail}{hint}")


_OPTIMIZER_MISSING = "has no optimizer state"

_OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")


def _has_optimizer_state(checkpoint: Path) -> bool:
    return all((checkpoint / name).is_file() for name in _OPTIMIZER_FILES)


def checkpoint_problem(checkpoint: Path, step: int, weights_only: bool = False) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (None if it can).

    Checks, cheapest first: ``trainer_state.json`` readable and at ``step`` (the Trainer writes it
    last, so a kill while saving leaves it out); the adapter weights present and whole (the
    safetensors header must cover the file); ``optimizer.pt`` and ``scheduler.pt`` present and
    readable archives (not required with ``weights_only``).
    """
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return "has no readable trainer_state.json (killed while saving?)"
    if not isinstance(state, dict) or state.get("global_step") != step:
        return "has a trainer_state.json of another step"
    weights = checkpoint / "adapter_model.safetensors"
    if weights.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                list(f.keys())
        except Exception as exc:  # SafetensorError: truncated or corrupt
            return f"has damaged adapter weights ({_first_line(exc)})"
    elif not (checkpoint / "adapter_model.bin").is_file():
        return "has no adapter weights"
    if not _has_optimizer_state(checkpoint):
        if weights_only:
            return None
        return _OPTIMIZER_MISSING + " (optimizer.pt, scheduler.pt)"
    for name in _OPTIMIZER_FILES:
        try:
            with zipfile.ZipFile(checkpoint / name) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile) as exc:
            return f"has a damaged {name} ({_first_line(exc)})"
        if bad is not None:
            return f"has a damaged {name} (entry {bad} fails its checksum)"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def write_run_config(out: Path, config: TrainConfig) -> None:
    """Record the flags (and the data file's sha256) the checkpoints of a new run belong to."""
    write_json_atomic(out / CHECKPOINTS / RUN_CONFIG, {**asdict(config), DATA_SHA256: data_sha256(config.data)})


DATA_SHA256 = "data_sha256"  # the key of the data file's hash in RUN_CONFIG

# Flags that only say how to resume; an interrupted run was started without them.
_RESUME_FLAGS = frozenset({"resume_weights_only"})


def check_same_run(path: Path, config: TrainConfig) -> None:
    """Refuse to continue a checkpoint with flags that would change how it trains."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no record of the flags: trust the user
    if not isinstance(stored, dict):
        return
    now = asdict(config)
    differ = sorted(k for k in now if k in stored and k not in RESULT_NEUTRAL_FLAGS | _RESUME_FLAGS
                    and stored[k] != now[k])
    if differ:
        detail = ", ".join(f"{k}: {stored[k]!r} there, {now[k]!r} now" for k in differ)
        raise UserError(f"--resume with other flags than the interrupted run ({detail}); use the same flags")
    if stored.get(DATA_SHA256) is not None:
        current = data_sha256(config.data)
        if current != stored[DATA_SHA256]:
            raise UserError(
                f"--resume: the data file {config.data} changed since the interrupted run started "
                f"(sha256 {stored[DATA_SHA256][:12]}... then, {str(current)[:12]}... now); restore it, "
                "or start the run again with --overwrite"
            )


def checkpoint_step(checkpoint: str | None) -> int:
    """The step a resumed run started from (0 for a fresh run)."""
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0
