"""Probe: how the batching of the bench's training records moves the eval loss, order by order.

The bench's eval-loss check compares ours with the configured Trainer on one data order (quick) or
three; this probe trains the bench's split (`BenchConfig`: 128 records, batch 8, OLoRA+ ratio 0.25,
lr 3e-4, one epoch) once per data order (seed) with each batching and prints one JSON line per run:

- ``ours``: `oloraplus train`'s pipeline as the bench runs it (`bench.harness.child_ours`;
  length-grouped: `data.LengthGroupedSampler`, mega-batches of 64 batches, so the whole split is
  sorted by length);
- ``ours-random``: the same with `group_by_length=False` (the Trainer's random batches);
- ``ours-megaN``: our sampler with mega-batches of N batches (N = 4 is the Trainer's own
  `group_by_length` rule at 128 records: `min(n // (4 x batch), 50)` batches per mega-batch);
- ``configured``: the bench's configured Trainer column (`bench.harness.child_configured`).

Run from the repo root: .venv/bin/python -m bench.grouping_probe MODEL VARIANT SEED [SEED ...]
(bench/NOTES.md has the numbers).
"""
import functools
import json
import sys

import oloraplus.fast.trainer as fast_trainer
from bench.harness import BenchConfig, child_configured, child_ours


def main() -> None:
    model_name, variant, seeds = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]]
    cfg = BenchConfig(model=model_name, n_train=128, n_eval=64)
    if variant.startswith("ours-mega"):  # the sampler FastTrainerMixin builds, with other mega-batches
        mega = int(variant.removeprefix("ours-mega"))
        fast_trainer.LengthGroupedSampler = functools.partial(fast_trainer.LengthGroupedSampler, mega_batches=mega)
    for seed in seeds:
        if variant == "configured":
            r = child_configured(cfg, seed)
        else:
            r = child_ours(cfg, seed, measure_all=False, group_by_length=variant != "ours-random")
        print(json.dumps({"model": model_name, "variant": variant, "seed": seed, "eval_loss": r["eval_loss"],
                          "seconds": r["seconds"]}), flush=True)


if __name__ == "__main__":
    main()
