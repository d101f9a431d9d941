"""Run folders and checkpoints: preparing ``--output``, finding the checkpoint ``--resume`` continues
from, and refusing to resume with flags that change the training."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from oloraplus.errors import UserError
from oloraplus.training.config import RESULT_NEUTRAL_FLAGS, TrainConfig


def prepare_output(output: str, overwrite: bool, resume: bool = False) -> Path:
    """Refuse to mix a new run into a folder that already holds something."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is an existing file; give a folder path")
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise UserError(f"--output {out} is not empty; pass --overwrite to replace it, or choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


CHECKPOINTS = "checkpoints"  # OUTPUT/checkpoints/checkpoint-N, written by the Trainer

RUN_CONFIG = "run_config.json"  # OUTPUT/checkpoints/run_config.json: the flags the checkpoints belong to


def resume_checkpoint(config: TrainConfig) -> str | None:
    """The checkpoint ``--resume`` continues from (None without --resume).

    The newest checkpoint whose ``trainer_state.json`` (the Trainer writes it last) is readable:
    a process killed while saving leaves a folder without it, which is skipped. Read-only, so
    every process of a distributed run can call it.
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
    for step in sorted(steps, reverse=True):
        try:
            state = json.loads((folder / f"checkpoint-{step}" / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if state.get("global_step") == step:
            check_same_run(folder / RUN_CONFIG, config)
            return str(folder / f"checkpoint-{step}")
    raise UserError(
        f"--resume: no complete checkpoint in {folder} (runs write them with --save-steps N); "
        "start the run again with --overwrite"
    )


def check_same_run(path: Path, config: TrainConfig) -> None:
    """Refuse to continue a checkpoint with flags that would change how it trains."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no record of the flags: trust the user
    now = asdict(config)
    differ = sorted(k for k in now if k in stored and k not in RESULT_NEUTRAL_FLAGS and stored[k] != now[k])
    if differ:
        detail = ", ".join(f"{k}: {stored[k]!r} there, {now[k]!r} now" for k in differ)
        raise UserError(f"--resume with other flags than the interrupted run ({detail}); use the same flags")


def checkpoint_step(checkpoint: str | None) -> int:
    """The step a resumed run started from (0 for a fresh run)."""
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0
