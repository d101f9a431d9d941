"""Probe: how the batching of the bench's training records moves the eval loss, order by order.

The bench's eval-loss check compares ours with the configured Trainer on one data order (quick) or
three; this probe trains the bench's split (`BenchConfig`: 128 records, batch 8, OLoRA+ ratio 0.25,
lr 3e-4, one epoch) once per data order (seed) with each batching and prints one JSON line per run:

- ``ours``: `oloraplus train`'s pipeline as the bench runs it (length-grouped: `data.LengthGroupedSampler`,
  mega-batches of 64 batches, so the whole split is sorted by length);
- ``ours-random``: the same with `group_by_length=False` (the Trainer's random batches);
- ``ours-megaN``: our sampler with mega-batches of N batches (N = 4 is the Trainer's own
  `group_by_length` rule at 128 records: `min(n // (4 x batch), 50)` batches per mega-batch);
- ``configured``: the bench's configured Trainer column (`bench.harness.child_configured`).

Run from the repo root: .venv/bin/python -m bench.grouping_probe MODEL VARIANT SEED [SEED ...]
(bench/NOTES.md has the numbers).
"""
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import BenchConfig, _eval_loss, child_configured, split_examples


def run_ours(model_name: str, variant: str, seed: int) -> dict:
    from transformers import set_seed

    from oloraplus.data.batching import LengthGroupedSampler
    from oloraplus.fast.precision import prepare_for_compute
    from oloraplus.method.adapters import apply_olora
    from oloraplus.training.config import TrainConfig
    from oloraplus.training.recipe import build_trainer, load_base_model
    from oloraplus.training.runtime import merged_for_eval

    cfg = BenchConfig(model=model_name, n_train=128, n_eval=64)
    tc = TrainConfig(output="unused", model=model_name, method="olora-plus", ratio=cfg.ratio, n_train=cfg.n_train,
                     n_eval=cfg.n_eval, seed=seed, batch_size=cfg.batch_size, progress=False,
                     group_by_length=variant != "ours-random")
    model, tokenizer, precision = load_base_model(tc, "cpu")
    _, train, evals = split_examples(cfg, tokenizer)
    set_seed(seed)
    model = apply_olora(model, tc.adapter_config())
    prepare_for_compute(model, precision, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(tc, model, tokenizer, train, Path(tmp), precision, "cpu")
        if variant.startswith("ours-mega"):
            mega = int(variant.removeprefix("ours-mega"))
            lengths = [len(e.input_ids) for e in train]
            trainer._get_train_sampler = lambda dataset=None: LengthGroupedSampler(lengths, cfg.batch_size, seed, mega)
        t = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t
    return {"eval_loss": _eval_loss(merged_for_eval(model), evals, tokenizer.pad_token_id), "seconds": seconds}


def main() -> None:
    model_name, variant, seeds = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]]
    for seed in seeds:
        if variant == "configured":
            r = child_configured(BenchConfig(model=model_name, n_train=128, n_eval=64), seed)
            r = {"eval_loss": r["eval_loss"], "seconds": r["seconds"]}
        else:
            r = run_ours(model_name, variant, seed)
        print(json.dumps({"model": model_name, "variant": variant, "seed": seed, **r}), flush=True)


if __name__ == "__main__":
    main()
