"""Probe: the bench's OLoRA+ / OLoRA step-time measurement (`bench.harness._overhead`: ratio 16 vs
ratio 1 on the same batches, interleaved, median of the per-batch ratios), repeated, to see its
spread at a given number of batches.

Run from the repo root: .venv/bin/python -m bench.overhead_probe MODEL STEPS REPEATS
(one JSON line per repeat; bench/NOTES.md has the numbers).
"""
import json
import sys

from bench.harness import BenchConfig, _overhead, split_examples
from bench.probe_setup import training_model_and_batches
from oloraplus.training.runtime import autocast


def main() -> None:
    name, steps, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model, _, tokenizer = training_model_and_batches(name, with_tokenizer=True)
    cfg = BenchConfig(model=name, n_train=128, n_eval=8)
    _, train, _ = split_examples(cfg, tokenizer)
    for r in range(repeats):
        with autocast("bf16", "cpu"):
            result = _overhead(model, train, tokenizer.pad_token_id, cfg, steps=steps)
        print(json.dumps({"model": name, "steps": steps, "repeat": r, **result}), flush=True)


if __name__ == "__main__":
    main()
