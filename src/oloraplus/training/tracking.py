"""Experiment tracking (``--report-to``) and the learning-rate schedule options of a run.

``--report-to tensorboard|mlflow|wandb`` hands the Trainer's own integration callbacks, besides its
usual rows (train ``loss``, ``learning_rate``, ``grad_norm``), rows that the Trainer does not log:
the two LoRA+ learning rates ``lr_A`` and ``lr_B`` (read from the optimizer's named groups: the rates
the logged step used, as the Trainer's ``learning_rate`` is; with each train loss row), each
validation loss ``val_loss`` (``--n-val``, ``--eval-steps``) and, with
``--track-dynamics K``, the adapter drift (``b_subspace_drift``, ``b_rel_change``, ...) every K steps.
These rows go to the integrations only: the Trainer's ``log_history`` (and so results.json) is as
without tracking. TensorBoard writes to ``OUTPUT/logs``; MLflow and W&B follow their own
environment variables (``MLFLOW_TRACKING_URI``, ``WANDB_PROJECT``, ...).
"""

from __future__ import annotations

import importlib.util
import math

from transformers import TrainerCallback

from oloraplus.errors import UserError

REPORT_TO = ("none", "tensorboard", "mlflow", "wandb")
LR_SCHEDULERS = ("linear", "cosine", "constant")
LOGS_FOLDER = "logs"  # OUTPUT/logs: the TensorBoard event files

# --report-to value -> (module that must be importable, the pip extra that installs it)
_BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
             "wandb": ("wandb", "wandb")}


def check_backend(report_to: str) -> None:
    """A :class:`UserError` naming the extra to install when the ``--report-to`` package is missing."""
    if report_to not in REPORT_TO:
        raise UserError(f"unknown report to '{report_to}': choose one of {', '.join(REPORT_TO)}")
    if report_to == "none":
        return
    module, extra = _BACKENDS[report_to]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"--report-to {report_to} needs the {module} package: pip install 'oloraplus[{extra}]' "
                        f"(or pip install {module})")


def trainer_report_to(report_to: str) -> list[str]:
    """The ``TrainingArguments.report_to`` list for a ``--report-to`` value."""
    return [] if report_to == "none" else [report_to]


def warmup_steps_arg(warmup_ratio: float) -> float:
    """``TrainingArguments.warmup_steps`` for ``--warmup-ratio``: a fraction below 1 is read by the
    Trainer as that fraction of the optimiser steps (rounded up); 0 is no warmup."""
    return warmup_ratio if warmup_ratio > 0 else 0


def scheduler_type(lr_scheduler: str, warmup_ratio: float) -> str:
    """``TrainingArguments.lr_scheduler_type`` for ``--lr-scheduler`` (the Trainer's "constant" ignores
    any warmup; "constant_with_warmup" is the one that applies it)."""
    return "constant_with_warmup" if lr_scheduler == "constant" and warmup_ratio else lr_scheduler


def schedule_text(lr_scheduler: str, warmup_ratio: float, warmup_steps: int | None = None) -> str:
    """results.json's ``training.lr_schedule``: the schedule the run used, in words."""
    if lr_scheduler == "linear" and not warmup_ratio:
        return "linear decay, no warmup (Trainer default)"  # the text of every run before these options
    shape = {"linear": "linear decay to 0", "cosine": "cosine decay to 0", "constant": "constant"}[lr_scheduler]
    if not warmup_ratio:
        return f"{shape}, no warmup"
    steps = "" if warmup_steps is None else f" = {warmup_steps} steps"
    return f"linear warmup over the first {warmup_ratio:g} of the steps{steps}, then {shape}"


def group_lrs(optimizer) -> dict[str, float]:
    """``{"lr_A": ..., "lr_B": ...}``: the current learning rates of the named LoRA+ groups."""
    rates = {}
    for group in getattr(optimizer, "param_groups", []):
        name = group.get("name")
        if name in ("lora_A", "lora_B"):
            rates[f"lr_{name[-1]}"] = float(group["lr"])
    return rates


def _scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a row (nested and None values left out), without its ``step``."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class TrackingCallback(TrainerCallback):
    """Sends ``lr_A``/``lr_B``, ``val_loss`` and the drift rows to the integration callbacks.

    ``integrations``: the Trainer's ``--report-to`` callbacks (see :func:`attach_tracking`);
    ``dynamics``: the ``DynamicsCallback`` of ``--track-dynamics``, or None.
    """

    def __init__(self, integrations: list, dynamics=None):
        self.integrations, self.dynamics = integrations, dynamics
        self._sent_drift_step: int | None = None
        self._step_lrs: dict[str, float] = {}

    def _send(self, args, state, control, row: dict, **kwargs) -> None:
        row = _scalars(row)
        if row and state.is_world_process_zero:
            kwargs.pop("logs", None)
            for callback in self.integrations:
                callback.on_log(args, state, control, logs=dict(row), **kwargs)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        # the rates this step's update uses (the scheduler moves them on before the step's log row),
        # as the Trainer's own learning_rate is
        self._step_lrs = group_lrs(optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # a train loss row: the two learning rates at the same step
            self._send(args, state, control, self._step_lrs, **kwargs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        from oloraplus.training.validation import VAL_LOSS

        if metrics and VAL_LOSS in metrics:
            self._send(args, state, control, {VAL_LOSS: metrics[VAL_LOSS]}, **kwargs)

    def _drift(self, args, state, control, **kwargs) -> None:
        row = getattr(self.dynamics, "last_row", None)
        if row is not None and row.get("step") != self._sent_drift_step:
            self._sent_drift_step = row.get("step")
            self._send(args, state, control, row, **kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        self._drift(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        self._drift(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self._drift(args, state, control, **kwargs)


def attach_tracking(trainer, report_to: str, logging_dir, dynamics=None) -> TrackingCallback | None:
    """Wire ``--report-to`` into ``trainer``; call after every other callback is added.

    The integration callbacks move to the end of the callback list, so that at train end they
    receive the last validation loss and drift row before they close their run; TensorBoard writes
    into ``logging_dir``. Returns the :class:`TrackingCallback` (None for ``--report-to none``).
    """
    if report_to == "none":
        return None
    from transformers.integrations import get_reporting_integration_callbacks

    classes = tuple(get_reporting_integration_callbacks(trainer_report_to(report_to)))
    handler = trainer.callback_handler
    integrations = [cb for cb in handler.callbacks if isinstance(cb, classes)]
    for callback in integrations:
        handler.remove_callback(callback)
        if getattr(callback, "logging_dir", "absent") is None:  # TensorBoard, unless TENSORBOARD_LOGGING_DIR
            callback.logging_dir = str(logging_dir)
    tracking = TrackingCallback(integrations, dynamics)
    handler.add_callback(tracking)
    for callback in integrations:
        handler.add_callback(callback)
    return tracking
