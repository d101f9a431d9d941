"""The validation loss during training (``--n-val``, ``--eval-steps``).

The validation records are carved from the training records (``data.split``), never the eval
records, so a hyper-parameter search on this loss (``oloraplus tune``) does not look at the eval
set. The loss is :func:`oloraplus.evaluation.evaluate.eval_loss` on the model as it trains: the
adapters unmerged, under the training precision (bf16 autocast where training uses it).
"""

from __future__ import annotations

from transformers import TrainerCallback

from oloraplus.data.tokenize import Example
from oloraplus.evaluation.evaluate import eval_loss
from oloraplus.training.runtime import autocast

VAL_LOSS = "val_loss"


class ValidationCallback(TrainerCallback):
    """Every ``every`` steps (if set) and once at the end of training, the validation loss.

    Each value is appended to the Trainer's ``state.log_history`` as ``{"step", "val_loss"}`` (so
    it is saved in checkpoints and survives ``--resume``) and handed to every callback's
    ``on_evaluate`` as ``metrics={"val_loss": ...}``: the hook a pruner (``oloraplus tune``)
    listens on. Set :attr:`handler` to the Trainer's ``callback_handler`` for that.
    """

    def __init__(self, examples: list[Example], pad_id: int, every: int | None, precision: str, device: str,
                 batch_size: int = 8, fast: bool = True):
        self.examples, self.pad_id, self.every = examples, pad_id, every
        self.precision, self.device, self.batch_size, self.fast = precision, device, batch_size, fast
        self.handler = None

    def measure(self, model) -> float:
        """The validation loss of ``model`` now (the model is left in train mode)."""
        was_training = model.training
        with autocast(self.precision, self.device):
            loss = eval_loss(model, self.examples, self.pad_id, self.batch_size, progress=False,
                             fast=self.fast)["eval_loss"]
        model.train(was_training)
        return loss

    def _record(self, args, state, control, model) -> None:
        if last_val_step(state.log_history) == state.global_step:
            return  # measured at this step already (the last step, a multiple of --eval-steps)
        loss = self.measure(model)
        state.log_history.append({"step": state.global_step, VAL_LOSS: loss})
        if self.handler is not None:
            self.handler.on_evaluate(args, state, control, metrics={VAL_LOSS: loss})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._record(args, state, control, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._record(args, state, control, model)


def last_val_step(log_history: list[dict]) -> int | None:
    """The step of the latest validation loss in a Trainer log history (None: none yet)."""
    return next((row["step"] for row in reversed(log_history) if VAL_LOSS in row), None)


def val_log(log_history: list[dict]) -> list[dict]:
    """The validation losses of a Trainer log history: ``[{"step", "val_loss"}]`` in step order."""
    return [{"step": row["step"], VAL_LOSS: row[VAL_LOSS]} for row in log_history if VAL_LOSS in row]
