"""``--track-dynamics``: a Trainer callback that records the adapters' drift every K steps."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from oloraplus.analysis.drift import (
    REFERENCES,
    LayerReference,
    aggregate,
    finite_or_none,
    layer_metrics,
    layer_type,
    rel_change,
    span_basis,
    to_work_dtype,
    top_left_singular_vectors,
)
from oloraplus.errors import UserError, check_positive
from oloraplus.files import append_jsonl_atomic
from oloraplus.method.adapters import init_for_peft_value, olora_factors


def peft_init(model: torch.nn.Module) -> str:
    """"olora" (or "pissa") when every adapter has the OLoRA (PiSSA) start, else "lora"; a start with
    no reference, or PiSSA beside another start, is a :class:`UserError` rather than a drift measured
    from the wrong start."""
    configs = getattr(model, "peft_config", None) or {}
    values = {str(value): init_for_peft_value(value)
              for value in (getattr(c, "init_lora_weights", True) for c in configs.values())}
    unknown = sorted(value for value, init in values.items() if init not in REFERENCES)
    if unknown:
        raise UserError(f"--track-dynamics supports {', '.join(REFERENCES)} adapters, not {', '.join(unknown)}")
    inits = set(values.values())
    if "pissa" in inits and len(inits) > 1:
        raise UserError(f"--track-dynamics needs one start for every adapter, got {', '.join(sorted(inits))}")
    return next(iter(inits)) if len(inits) == 1 else "lora"


class DynamicsCallback(TrainerCallback):
    """Every ``every_k`` optimizer steps, append the aggregate metrics of the live adapter to a JSONL file.

    Rows are ``{"step": n, **aggregate}``: step 0 (at train start), every multiple of ``every_k``,
    and the last step. At train start the LoRA factors are captured as the start (B_0, A_0): under
    OLoRA init these are Q_r and R_r of the original W (under PiSSA, W's scaled top-r singular
    factors). The original weight is recovered from the wrapped layer as W = base + s B_0 A_0 (both
    inits subtracted s B_0 A_0 from it) for Q_r and U_r; only out x r matrices are kept.
    ``reference``: "auto" (OLoRA or PiSSA when the PEFT config says init_lora_weights="olora" or
    "pissa", else LoRA), or "olora"/"lora"/"pissa" to force how the start is read (see the module
    docstring); under LoRA the captured random A_0 gives ``a_rel_change`` too.

    Runs on the main process only. A run resumed from a checkpoint captures the resumed weights as
    its start. Not for ZeRO-3/FSDP-sharded parameters (each rank sees only a shard).
    """

    def __init__(self, every_k: int, output_path: str | Path, reference: str = "auto", adapter: str = "default"):
        check_positive("every_k", every_k, integer=True)
        if reference not in ("auto", *REFERENCES):
            raise UserError(f"reference must be auto, {', '.join(REFERENCES)}, got '{reference}'")
        self.every_k = every_k
        self.output_path = Path(output_path)
        self.reference = reference
        self.adapter = adapter
        self.references: dict[str, LayerReference] = {}
        self.last_step: int | None = None
        self.last_row: dict | None = None

    def _layers(self, model) -> dict:
        from oloraplus.method.adapters import lora_layers

        layers = {name: layer for name, layer in lora_layers(model).items() if self.adapter in layer.lora_A}
        if not layers:
            raise UserError(f"the model has no LoRA layers with adapter '{self.adapter}' to track")
        return layers

    @torch.no_grad()
    def capture(self, model: torch.nn.Module) -> None:
        """Record the start of every LoRA layer (called at train begin)."""
        init = peft_init(model) if self.reference == "auto" else self.reference
        self.references = {}
        for name, layer in self._layers(model).items():
            b_0 = layer.lora_B[self.adapter].weight.detach().float()
            a_0 = layer.lora_A[self.adapter].weight.detach().float()
            scale = layer.scaling[self.adapter]
            base = layer.get_base_layer().weight.detach().float()
            weight = base + scale * (b_0 @ a_0)  # the original W
            rank = b_0.shape[1]
            if init == "lora":  # measured against what OLoRA would have started from
                q_r = to_work_dtype(olora_factors(weight, rank)[0])
            elif init == "olora":  # B_0 = Q_r
                q_r = to_work_dtype(b_0)
            else:  # PiSSA: span(B_0) is W's top-r left singular subspace, so it is U_r too (no SVD)
                q_r = span_basis(b_0)
            self.references[name] = LayerReference(
                init=init,
                b_0=torch.zeros_like(q_r) if init == "lora" else to_work_dtype(b_0),
                a_0=to_work_dtype(a_0),
                q_r=q_r,
                u_r=q_r if init == "pissa" else top_left_singular_vectors(weight, rank),
                w_norm=float(torch.linalg.norm(weight)),
            )
            del weight

    @torch.no_grad()
    def measure(self, model: torch.nn.Module) -> dict:
        """The aggregate metrics of the live adapter against the captured start."""
        rows = {}
        for name, layer in self._layers(model).items():
            ref = self.references[name]
            if ref.init == "lora":  # delta = s (B A - 0 * A_0): A_0 enters only a_rel_change
                ref_update = LayerReference("lora", ref.b_0, None, ref.q_r, ref.u_r, ref.w_norm)
            else:
                ref_update = ref
            b_t, a_t = layer.lora_B[self.adapter].weight, layer.lora_A[self.adapter].weight
            row = layer_metrics(ref_update, b_t, a_t, layer.scaling[self.adapter])
            if ref.init == "lora":
                row["a_rel_change"] = finite_or_none(rel_change(a_t, ref.a_0))
            rows[name] = {"layer_type": layer_type(name), **row}
        return aggregate(rows)

    def _write(self, step: int, model) -> None:
        row = {"step": step, **self.measure(model)}
        append_jsonl_atomic(self.output_path, row)
        self.last_step, self.last_row = step, row  # last_row: for --report-to (training.tracking)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self.capture(model)
            self._write(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None and state.global_step % self.every_k == 0:
            self._write(state.global_step, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None and self.last_step != state.global_step:
            self._write(state.global_step, model)


def attach_dynamics(trainer, every_k: int, path: str | Path, reference: str = "auto") -> DynamicsCallback:
    """Add a :class:`DynamicsCallback` writing to ``path`` to ``trainer``; returns the callback."""
    callback = DynamicsCallback(every_k, path, reference=reference)
    trainer.add_callback(callback)
    return callback
