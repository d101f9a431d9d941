"""Probe: training step time with transformers' eager attention, our grouped kernel and SDPA, on CPU.

Forward + backward (bf16 autocast, frozen weights in bf16, LoRA r = 32, as `oloraplus train` runs)
of batches of 8 real Alpaca records, the three kernels alternated on each batch, 3 repeats, wall
time, 2 threads. Without lengths: 8 length-sorted batches of the bench's 256-record split (every
32nd record). With lengths: for each, the 8 records of the first 3000 nearest below that length.
Run from the repo root on a quiet machine:
    .venv/bin/python -m bench.attention_probe smollm2-135m [60,120,200,256,320,400,500]
"""
import sys
import time

from bench.probe_setup import forward_backward, training_model_and_batches  # noqa: E402
from oloraplus.fast.attention import GROUPED, use_attention  # noqa: E402

name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
lengths = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else None
model, batches = training_model_and_batches(name, lengths)


def step(batch, kernel: str) -> float:
    use_attention(model, kernel)
    t = time.perf_counter()
    forward_backward(model, batch)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


kernels = ["eager", GROUPED, "sdpa"]
for batch in batches:  # warm-up
    for kernel in kernels:
        step(batch, kernel)
seconds = {k: [0.0] * len(batches) for k in kernels}
for _ in range(3):
    for i, batch in enumerate(batches):
        for kernel in kernels:
            seconds[kernel][i] += step(batch, kernel)
for i, batch in enumerate(batches):
    print(f"{batch['input_ids'].shape[1]:4d} tokens: " + ", ".join(f"{k} {seconds[k][i] / 3:.3f} s" for k in kernels)
          + f"; SDPA / grouped {seconds['sdpa'][i] / seconds[GROUPED][i]:.3f},"
          f" eager / grouped {seconds['eager'][i] / seconds[GROUPED][i]:.3f}", flush=True)
total = {k: sum(v) for k, v in seconds.items()}
print("all batches: " + ", ".join(f"{k} {v:.2f} s" for k, v in total.items())
      + f"; eager / grouped {total['eager'] / total[GROUPED]:.3f}, SDPA / grouped {total['sdpa'] / total[GROUPED]:.3f}")
