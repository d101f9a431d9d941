"""The fine-tuning recipe behind ``oloraplus train`` and ``oloraplus evaluate``.

One config dataclass, one readable function per job:
load data -> split -> load model -> add OLoRA adapters -> train with LoRA+ groups ->
evaluate -> write ``adapter/``, ``predictions.jsonl``, ``eval_losses.json`` and, last, ``results.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from oloraplus.data.batching import Collator, ExampleDataset
from oloraplus.data.formats import FORMATS, load_data
from oloraplus.data.split import split_records
from oloraplus.data.tokenize import Example, check_kept, tokenize_records
from oloraplus.errors import UserError
from oloraplus.evaluation.evaluate import evaluate_model
from oloraplus.fast.compile import compile_layers
from oloraplus.fast.memory import keep_freed_memory, release_freed_memory
from oloraplus.fast.precision import prepare_for_compute
from oloraplus.fast.trainer import FastTrainerMixin
from oloraplus.files import write_json_atomic, write_text_atomic
from oloraplus.method.adapters import INITS, apply_olora
from oloraplus.method.card import write_model_card
from oloraplus.method.export import start_factors, write_standard_lora
from oloraplus.method.identity import check_adapter_identity, model_fingerprint, write_adapter_identity
from oloraplus.method.optim import optimizer_groups
from oloraplus.method.registry import METHODS
from oloraplus.method.trainer import OLoRAPlusTrainer, OLoRAPlusTrainingArguments
from oloraplus.models.loading import default_device, load_model
from oloraplus.training.checkpoints import (
    checkpoint_step,
    finish_output,
    prepare_output,
    releases_output,
    resume_checkpoint,
    run_folder,
    run_inputs,
    write_run_config,
)
from oloraplus.training.config import EVALUATE_FIELDS, TrainConfig
from oloraplus.training.distributed import (
    gather_objects,
    is_main_process,
    local_device,
    per_device_batch_size,
    ranks_finish_together,
    world_size,
)
from oloraplus.training.integrity import check_data
from oloraplus.training.provenance import host, library_versions
from oloraplus.training.runtime import merged_for_eval, resolve_precision
from oloraplus.training.tracking import (
    LOGS_FOLDER,
    attach_tracking,
    schedule_text,
    scheduler_type,
    trainer_report_to,
    warmup_steps_arg,
)
from oloraplus.training.validation import VAL_LOSS, ValidationCallback, val_log

if TYPE_CHECKING:
    from transformers import TrainerCallback


def load_split(config: TrainConfig):
    source = load_data(config.data, config.format, config.prompt_field, config.response_field, config.template,
                       config.split)
    split = split_records(source, config.n_train, config.n_eval, config.data_seed, config.n_val)
    split.provenance.update(format=source.format, records_sha256=source.records_sha256,
                            **({"skipped": source.skipped} if any(source.skipped.values()) else {}))
    return split


@releases_output  # a failed run leaves the old --output as it was
def train(config: TrainConfig, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Fine-tune, evaluate and write the run folder. Returns the results dict.

    ``callbacks``: more ``transformers.TrainerCallback`` objects for the Trainer, after the
    validation one (their ``on_evaluate`` receives each validation loss; ``oloraplus tune`` prunes there).
    """
    from transformers import set_seed

    config.validate()
    resume_from = resume_checkpoint(config)
    # Only the main process checks, claims and stages the folder (the others would race it).
    out = (prepare_output(config.output, config.overwrite, config.resume, run_inputs(config))
           if is_main_process() else run_folder(config))
    if config.save_steps and not resume_from and is_main_process():
        write_run_config(out, config)  # the flags and the data file's sha256, compared on --resume
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    split = load_split(config)
    device = local_device(default_device())
    model, tokenizer, precision = load_base_model(config, device)
    fmt = split.provenance["format"]
    train_examples, train_stats = tokenize_records(split.train, tokenizer, config.max_length, fmt)
    eval_examples, eval_stats = tokenize_records(split.eval, tokenizer, config.max_length, fmt)
    check_data(config, split, (train_examples, train_stats), (eval_examples, eval_stats))
    val_examples, val_stats = tokenize_records(split.val, tokenizer, config.max_length, fmt)
    if split.val:
        check_kept(val_examples, val_stats, "validation", config.data, config.max_length)
    base_fingerprint = model_fingerprint(model)  # before the init changes the base weights
    timings["load"] = time.perf_counter() - t0

    set_seed(config.seed)
    t = time.perf_counter()
    model = apply_olora(model, config.adapter_config())
    start = start_factors(model) if config.export else None  # B_0, A_0 for adapter-lora
    timings["init"] = time.perf_counter() - t
    if config.fast:  # the plain path trains the model as PEFT built it
        prepare_for_training(model, config, precision, device)

    trainer = build_trainer(config, model, tokenizer, train_examples, out, precision, device)
    dynamics = None
    if config.track_dynamics:
        from oloraplus.analysis.dynamics import attach_dynamics

        dynamics = attach_dynamics(trainer, config.track_dynamics, out / "dynamics.jsonl")
    if split.val:  # first, so that the callbacks below see each validation loss
        validation = ValidationCallback(val_examples, tokenizer.pad_token_id, config.eval_steps, precision, device,
                                        config.eval_batch_size, config.fast)
        validation.handler = trainer.callback_handler
        trainer.add_callback(validation)
    for callback in callbacks:
        trainer.add_callback(callback)
    attach_tracking(trainer, config.report_to, out / LOGS_FOLDER, dynamics)  # --report-to: after the others
    t = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    timings["train"] = time.perf_counter() - t
    steps = trainer.state.global_step
    trained_tokens = _tokens_seen(train_examples, steps, config)
    rank_groups = gather_objects(optimizer_groups(trainer.optimizer))  # every rank's LoRA+ groups
    with ranks_finish_together():  # under torchrun the other ranks wait here for rank 0
        if not is_main_process():
            return {}  # rank 0 alone evaluates and writes the run folder

        model.save_pretrained(out / "adapter")
        prompt_format = split.provenance["format"]
        write_adapter_identity(out / "adapter", base_fingerprint, config.model, prompt_format)
        if config.export:  # the same model as a standard LoRA on the untouched base (export --to lora)
            write_standard_lora(out / "adapter", out / "adapter-lora", start)
            write_adapter_identity(out / "adapter-lora", base_fingerprint, config.model, prompt_format)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if config.evaluate:
            metrics, predictions, details, losses = run_evaluation(config, model, tokenizer, split, eval_examples)
            timings["eval_loss"] = details.pop("eval_loss_seconds")
            timings["predict"] = details.pop("predict_seconds")
            write_eval_outputs(out, predictions, losses)
        else:  # --no-evaluate (tuning): the validation loss is the run's only metric
            metrics, details = {}, {"skipped": "--no-evaluate"}
        val_rows = val_log(trainer.state.log_history)
        if val_rows:  # the loss after the last step (ValidationCallback measures it at the end)
            metrics[VAL_LOSS] = val_rows[-1][VAL_LOSS]
            details["val_loss"] = (f"response-token loss on the {len(val_examples)} validation records, adapters "
                                   f"unmerged, {precision} as in training")
        timings["total"] = time.perf_counter() - t0
        results = {
            "metrics": metrics,
            "evaluation": details,
            "config": asdict(config),
            "method": {"name": config.method, "init": METHODS[config.method].init, "ratio": config.lam,
                       "lr_A": config.lr, "lr_B": config.lr * config.lam},
            "precision": precision,
            "device": device,
            "data": {**split.provenance, "train_tokens": train_stats.to_dict(), "eval_tokens": eval_stats.to_dict(),
                     **({"val_tokens": val_stats.to_dict()} if split.val else {})},
            "training": {
                "steps": steps,
                "train_loss": train_output.training_loss,
                "tokens": trained_tokens,
                "tokens_per_second": (_tokens_seen(train_examples, steps - checkpoint_step(resume_from), config)
                                      / timings["train"]) if timings["train"] > 0 else None,
                "log": [row for row in trainer.state.log_history if "loss" in row],
                "lr_schedule": schedule_text(config.lr_scheduler, config.warmup_ratio,
                                             trainer.args.get_warmup_steps(trainer.state.max_steps)),
                "trainable_parameters": trainable,
                "processes": world_size(),
                "per_device_batch_size": per_device_batch_size(config.batch_size),
                "optimizer_groups_per_rank": rank_groups,
                "resumed_from": resume_from,  # train_loss then averages the resumed steps only
                **({"val_log": val_rows} if split.val else {}),  # [{step, val_loss}] (--n-val, --eval-steps)
            },
            "timings_seconds": timings,
            "host": host(),
            "versions": library_versions(),
        }
        write_cards(out, config, base_fingerprint, split.provenance, metrics)
        write_json_atomic(out / "results.json", results)  # last: its presence marks the run complete
        finish_output(config.output)  # an --overwrite run replaces the old output only now
        return results


def write_cards(out: Path, config: TrainConfig, base_fingerprint: str, provenance: dict, metrics: dict) -> None:
    """A model card (README.md) in ``adapter/`` and, if written, ``adapter-lora/`` (``method.card``)."""
    fields = dict(base_model=config.model, base_fingerprint=base_fingerprint, method=config.method,
                  init=METHODS[config.method].init, ratio=config.lam, lr=config.lr,
                  data_source=provenance["source"], data_sha256=provenance["sha256"], metrics=metrics)
    write_model_card(out / "adapter", "adapter", **fields)
    if (out / "adapter-lora").is_dir():
        write_model_card(out / "adapter-lora", "lora", **fields)


def _tokens_seen(examples: list[Example], steps: int, config: TrainConfig) -> int:
    """Non-pad tokens processed in training (whole epochs plus the partial one)."""
    per_epoch = sum(len(e.input_ids) for e in examples)
    steps_per_epoch = math.ceil(len(examples) / (config.batch_size * config.grad_accum))
    return int(per_epoch * steps / steps_per_epoch) if steps_per_epoch else 0


class RecipeTrainer(FastTrainerMixin, OLoRAPlusTrainer):
    """``OLoRAPlusTrainer`` with the Trainer speed patches of ``fast.trainer`` (``--fast``): tighter
    length grouping and the attention kernel chosen per batch length."""


def build_trainer(config, model, tokenizer, examples, out: Path, precision: str, device: str) -> OLoRAPlusTrainer:
    args = OLoRAPlusTrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=per_device_batch_size(config.batch_size),  # --batch-size is global
        gradient_accumulation_steps=config.grad_accum,  # a step: --batch-size x --grad-accum records
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type=scheduler_type(config.lr_scheduler, config.warmup_ratio),
        warmup_steps=warmup_steps_arg(config.warmup_ratio),
        seed=config.seed,
        bf16=precision == "bf16",
        use_cpu=device == "cpu",
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        # Checkpoints hold the adapter, optimizer (with its lr groups), scheduler, RNG states and
        # the data position; the last two are kept.
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=2,
        report_to=trainer_report_to(config.report_to),  # wired up in train() (training.tracking)
        logging_steps=10,
        remove_unused_columns=False,
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # under torchrun: every LoRA weight is used in each forward
        ratio=config.lam,
        # --gradient-checkpointing: non-reentrant, so the frozen inputs need no requires_grad
        **({"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
           if config.gradient_checkpointing else {}),
    )
    # --no-fast: the plain OLoRAPlusTrainer, the Trainer's own sampler, the model's own loss from labels
    trainer = (RecipeTrainer if config.fast else OLoRAPlusTrainer)(
        model=model,
        args=args,
        train_dataset=ExampleDataset(examples),
        data_collator=Collator(tokenizer.pad_token_id),
        head_on_labels_only=config.head_on_labels_only and config.fast,
    )
    if config.fast:
        trainer.attention, trainer.device_kind = config.attention, device
    return trainer


EVAL_LOSSES_FORMAT = 1


def run_evaluation(config, model, tokenizer, split, eval_examples):
    """Eval loss and BLEU/ROUGE on the merged model in fp32 (see ``runtime.merged_for_eval``).

    Returns ``(metrics, predictions, details, losses)``: ``losses`` is the content of
    ``eval_losses.json`` (numbers only): ``format``, ``eval_indices`` (each eval example's index in
    the data file, as ``results.json``'s ``data.eval_indices`` has them, in the order of
    ``eval_examples``) and, aligned with it, ``response_loss_sum``, ``response_tokens``,
    ``sequence_loss_sum``, ``sequence_tokens`` (``evaluation.evaluate.eval_loss``).
    """
    reference = FORMATS[split.provenance.get("format", "alpaca")].reference  # alpaca: the output field
    references = [reference(split.eval[e.index]) for e in eval_examples]
    metrics, predictions, details = evaluate_model(
        merged_for_eval(model),
        tokenizer,
        eval_examples,
        references,
        metrics_mode=config.metrics_mode,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.eval_batch_size,
        generation_batch_size=config.generation_batch_size,
        progress=config.progress,
        fast=config.fast,
    )
    details["precision"] = "fp32, adapters merged"
    per_example = details.pop("example_losses")
    losses = {"format": EVAL_LOSSES_FORMAT,
              "eval_indices": [split.provenance["eval_indices"][e.index] for e in eval_examples], **per_example}
    return metrics, predictions, details, losses


def write_eval_outputs(out: Path, predictions: list[dict], losses: dict) -> None:
    """``predictions.jsonl`` (one line per eval example) and ``eval_losses.json``, each atomically."""
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    write_json_atomic(out / "eval_losses.json", losses, indent=None)


def load_base_model(config: TrainConfig, device: str):
    """The base model and tokenizer as ``train`` and ``evaluate`` run them, and the resolved precision.

    With ``config.fast``, freed memory is kept for reuse first (``fast.memory.keep_freed_memory``),
    so that the model's own allocations already follow that policy; with ``--gradient-checkpointing``
    (memory over speed) only after the model is prepared (:func:`prepare_for_training`), so that the
    fp32 weights freed by the bf16 storage go back to the OS at once instead of raising the peak.
    """
    precision = resolve_precision(config.precision, device)
    if config.fast and not config.gradient_checkpointing:
        keep_freed_memory(device)
    # --fast under bf16 stores the frozen weights in bf16, so a checkpoint stored in bf16 is loaded as it
    # is: no fp32 copy of the model raises the peak while loading, and the function is the same for the
    # inits computed from W (in fp32). Not for PEFT's random init: PEFT casts its A_0 to the base's dtype.
    from_weight = INITS[config.adapter_config().init].factors is not None
    model, tokenizer = load_model(config.model, device=device,
                                  bf16_if_stored=config.fast and precision == "bf16" and from_weight)
    return model, tokenizer, precision


def prepare_for_training(model, config: TrainConfig, precision: str, device: str) -> None:
    """The ``--fast`` preparation of an adapted model for training, as ``train`` and the bench run it:
    ``fast.precision.prepare_for_compute``; with ``--gradient-checkpointing`` the freed memory handed
    back once (``fast.memory.release_freed_memory``), then kept for reuse (see :func:`load_base_model`);
    with ``--compile`` the decoder layers compiled."""
    prepare_for_compute(model, precision, device)
    if config.gradient_checkpointing:
        release_freed_memory(device)
        keep_freed_memory(device)
    if config.compile:
        compile_layers(model, device)


@releases_output
def evaluate_adapter(config: TrainConfig, adapter: str) -> dict:
    """Re-evaluate a saved adapter on the original base model (``oloraplus evaluate``)."""
    from peft import PeftModel

    config.validate(EVALUATE_FIELDS)

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    out = prepare_output(config.output, config.overwrite, inputs=run_inputs(config, adapter))
    split = load_split(config)
    device = default_device()
    model, tokenizer, precision = load_base_model(config, device)
    eval_examples, eval_stats = tokenize_records(split.eval, tokenizer, config.max_length,
                                                 split.provenance["format"])
    check_data(config, split, evaluation=(eval_examples, eval_stats))
    check_adapter_identity(adapter_dir, model, config.model)  # before PEFT re-runs the init on it
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as exc:
        raise UserError(f"cannot load adapter {adapter_dir} on model '{config.model}': {exc}") from exc
    # Round the base weights exactly as --fast training stored them, so the same function is evaluated.
    if config.fast:
        prepare_for_compute(model, precision, device)
    metrics, predictions, details, losses = run_evaluation(config, model, tokenizer, split, eval_examples)
    write_eval_outputs(out, predictions, losses)
    results = {
        "metrics": metrics,
        "evaluation": details,
        "adapter": str(adapter_dir.resolve()),
        "config": asdict(config),
        "precision": precision,
        "device": device,
        "data": {**split.provenance, "eval_tokens": eval_stats.to_dict()},
        "host": host(),
        "versions": library_versions(),
    }
    write_json_atomic(out / "results.json", results)
    finish_output(config.output)
    return results
