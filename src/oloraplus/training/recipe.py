"""The fine-tuning recipe behind ``oloraplus train`` and ``oloraplus evaluate``.

One config dataclass, one readable function per job:
load data -> split -> load model -> add OLoRA adapters -> train with LoRA+ groups ->
evaluate -> write ``adapter/``, ``predictions.jsonl`` and, last, ``results.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from oloraplus.data.batching import Collator, ExampleDataset, LengthGroupedSampler
from oloraplus.data.records import load_records
from oloraplus.data.split import split_records
from oloraplus.data.tokenize import Example, tokenize_records
from oloraplus.errors import UserError
from oloraplus.evaluation.evaluate import evaluate_model
from oloraplus.fast.attention import attention_kernel, current_attention, use_attention
from oloraplus.fast.compile import compile_layers
from oloraplus.fast.memory import keep_freed_memory
from oloraplus.fast.precision import prepare_for_compute
from oloraplus.files import write_json_atomic, write_text_atomic
from oloraplus.method.adapters import apply_olora
from oloraplus.method.optim import optimizer_groups
from oloraplus.method.registry import METHODS
from oloraplus.method.trainer import OLoRAPlusTrainer, OLoRAPlusTrainingArguments
from oloraplus.models.loading import load_model
from oloraplus.training.checkpoints import CHECKPOINTS, RUN_CONFIG, checkpoint_step, prepare_output, resume_checkpoint
from oloraplus.training.config import TrainConfig
from oloraplus.training.distributed import (
    gather_objects,
    is_main_process,
    local_device,
    per_device_batch_size,
    ranks_finish_together,
    world_size,
)
from oloraplus.training.provenance import library_versions
from oloraplus.training.runtime import default_device, merged_for_eval, resolve_precision


def load_split(config: TrainConfig):
    source = load_records(config.data)
    return split_records(source, config.n_train, config.n_eval, config.data_seed)


def train(config: TrainConfig) -> dict:
    """Fine-tune, evaluate and write the run folder. Returns the results dict."""
    from transformers import set_seed

    config.validate()
    resume_from = resume_checkpoint(config)
    # Only the main process creates or clears the folder (the others would race it).
    out = prepare_output(config.output, config.overwrite, config.resume) if is_main_process() else Path(config.output)
    if config.save_steps and not resume_from and is_main_process():
        write_json_atomic(out / CHECKPOINTS / RUN_CONFIG, asdict(config))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    split = load_split(config)
    device = local_device(default_device())
    model, tokenizer, precision = load_base_model(config, device)
    train_examples, train_stats = tokenize_records(split.train, tokenizer, config.max_length)
    eval_examples, eval_stats = tokenize_records(split.eval, tokenizer, config.max_length)
    timings["load"] = time.perf_counter() - t0

    set_seed(config.seed)
    t = time.perf_counter()
    model = apply_olora(model, config.adapter_config())
    timings["init"] = time.perf_counter() - t
    prepare_for_compute(model, precision, device)
    if config.compile:
        compile_layers(model, device)

    trainer = build_trainer(config, model, tokenizer, train_examples, out, precision, device)
    if config.track_dynamics:
        from oloraplus.analysis.dynamics import attach_dynamics

        attach_dynamics(trainer, config.track_dynamics, out / "dynamics.jsonl")
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
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        metrics, predictions, details = run_evaluation(config, model, tokenizer, split, eval_examples)
        timings["eval_loss"] = details.pop("eval_loss_seconds")
        timings["predict"] = details.pop("predict_seconds")

        write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
        timings["total"] = time.perf_counter() - t0
        results = {
            "metrics": metrics,
            "evaluation": details,
            "config": asdict(config),
            "method": {"name": config.method, "init": METHODS[config.method].init, "ratio": config.lam,
                       "lr_A": config.lr, "lr_B": config.lr * config.lam},
            "precision": precision,
            "device": device,
            "data": {**split.provenance, "train_tokens": train_stats.to_dict(), "eval_tokens": eval_stats.to_dict()},
            "training": {
                "steps": steps,
                "train_loss": train_output.training_loss,
                "tokens": trained_tokens,
                "tokens_per_second": (_tokens_seen(train_examples, steps - checkpoint_step(resume_from), config)
                                      / timings["train"]) if timings["train"] > 0 else None,
                "log": [row for row in trainer.state.log_history if "loss" in row],
                "lr_schedule": "linear decay, no warmup (Trainer default)",
                "trainable_parameters": trainable,
                "processes": world_size(),
                "per_device_batch_size": per_device_batch_size(config.batch_size),
                "optimizer_groups_per_rank": rank_groups,
                "resumed_from": resume_from,  # train_loss then averages the resumed steps only
            },
            "timings_seconds": timings,
            "versions": library_versions(),
        }
        write_json_atomic(out / "results.json", results)  # last: its presence marks the run complete
        return results


def _tokens_seen(examples: list[Example], steps: int, config: TrainConfig) -> int:
    """Non-pad tokens processed in training (whole epochs plus the partial one)."""
    per_epoch = sum(len(e.input_ids) for e in examples)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    return int(per_epoch * steps / steps_per_epoch) if steps_per_epoch else 0


class RecipeTrainer(OLoRAPlusTrainer):
    """``OLoRAPlusTrainer`` with tighter length grouping (see ``data.LengthGroupedSampler``) and
    the attention kernel chosen per batch length (see ``attention.attention_kernel``)."""

    attention: str = "auto"
    device_kind: str = "cpu"

    def compute_loss(self, model, inputs, *args, **kwargs):
        use_attention(self.model, attention_kernel(self.attention, self.device_kind, inputs["input_ids"].shape[1]))
        return super().compute_loss(model, inputs, *args, **kwargs)

    def train(self, *args, **kwargs):
        """Train; afterwards the model has its own attention kernel again (evaluation is unchanged)."""
        original = current_attention(self.model)
        try:
            return super().train(*args, **kwargs)
        finally:
            use_attention(self.model, original)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, ExampleDataset):
            return super()._get_train_sampler(train_dataset)
        global_batch = self.args.per_device_train_batch_size * self.args.world_size
        return LengthGroupedSampler([len(e.input_ids) for e in dataset.examples], global_batch, self.args.seed)


def build_trainer(config, model, tokenizer, examples, out: Path, precision: str, device: str) -> OLoRAPlusTrainer:
    args = OLoRAPlusTrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=per_device_batch_size(config.batch_size),  # --batch-size is global
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=0,
        seed=config.seed,
        bf16=precision == "bf16",
        use_cpu=device == "cpu",
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        # Checkpoints hold the adapter, optimizer (with its lr groups), scheduler, RNG states and
        # the data position; the last two are kept.
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        logging_steps=10,
        remove_unused_columns=False,
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # under torchrun: every LoRA weight is used in each forward
        ratio=config.lam,
    )
    trainer = RecipeTrainer(
        model=model,
        args=args,
        train_dataset=ExampleDataset(examples),
        data_collator=Collator(tokenizer.pad_token_id),
        head_on_labels_only=config.head_on_labels_only,
    )
    trainer.attention, trainer.device_kind = config.attention, device
    return trainer


def run_evaluation(config, model, tokenizer, split, eval_examples):
    """Eval loss and BLEU/ROUGE on the merged model in fp32 (see ``runtime.merged_for_eval``)."""
    references = [split.eval[e.index]["output"] for e in eval_examples]
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
    )
    details["precision"] = "fp32, adapters merged"
    return metrics, predictions, details


def load_base_model(config: TrainConfig, device: str):
    """The base model and tokenizer as ``train`` and ``evaluate`` run them, and the resolved precision.

    Freed memory is kept for reuse first (``runtime.keep_freed_memory``), so that the model's own
    allocations already follow that policy.
    """
    precision = resolve_precision(config.precision, device)
    keep_freed_memory(device)
    model, tokenizer = load_model(config.model, device=device)
    return model, tokenizer, precision


def evaluate_adapter(config: TrainConfig, adapter: str) -> dict:
    """Re-evaluate a saved adapter on the original base model (``oloraplus evaluate``)."""
    from peft import PeftModel

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    out = prepare_output(config.output, config.overwrite)
    split = load_split(config)
    device = default_device()
    model, tokenizer, precision = load_base_model(config, device)
    eval_examples, eval_stats = tokenize_records(split.eval, tokenizer, config.max_length)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as exc:
        raise UserError(f"cannot load adapter {adapter_dir} on model '{config.model}': {exc}") from exc
    # Round the base weights exactly as training stored them, so the same function is evaluated.
    prepare_for_compute(model, precision, device)
    metrics, predictions, details = run_evaluation(config, model, tokenizer, split, eval_examples)
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    results = {
        "metrics": metrics,
        "evaluation": details,
        "adapter": str(adapter_dir.resolve()),
        "config": asdict(config),
        "precision": precision,
        "device": device,
        "data": {**split.provenance, "eval_tokens": eval_stats.to_dict()},
        "versions": library_versions(),
    }
    write_json_atomic(out / "results.json", results)
    return results
