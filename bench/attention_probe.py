"""Probe: training step time with transformers' eager attention, our grouped kernel and SDPA, on CPU.

Forward + backward (bf16 autocast, frozen weights in bf16, LoRA r = 32, as `oloraplus train` runs)
of batches of 8 real Alpaca records, the three kernels alternated on each batch, 3 repeats, wall
time, 2 threads. Without lengths: 8 length-sorted batches of the bench's 256-record split (every
32nd record). With lengths: for each, the 8 records of the first 3000 nearest below that length.
Run from the repo root on a quiet machine:
    .venv/bin/python bench/attention_probe.py smollm2-135m [60,120,200,256,320,400,500]
"""
import sys
import time

from oloraplus.adapters import apply_olora
from oloraplus.attention import GROUPED, use_attention
from oloraplus.bench import BenchConfig, _split_examples
from oloraplus.data import DEFAULT_DATA, load_records, tokenize_records
from oloraplus.evaluation import collate, response_loss
from oloraplus.models import load_model
from oloraplus.runtime import autocast, keep_freed_memory, prepare_for_compute
from oloraplus.train import TrainConfig

keep_freed_memory("cpu")
name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
model, tok = load_model(name)
if len(sys.argv) > 2:
    examples, _ = tokenize_records(load_records(DEFAULT_DATA).records[:3000], tok, 512)
    examples.sort(key=lambda e: len(e.input_ids))
    batches = []
    for length in (int(x) for x in sys.argv[2].split(",")):
        i = min(range(len(examples)), key=lambda j: abs(len(examples[j].input_ids) - length))
        batches.append(collate(examples[max(0, i - 8) : max(8, i)], tok.pad_token_id))
else:
    _, train, _ = _split_examples(BenchConfig(model=name, n_train=256, n_eval=8), tok)
    train.sort(key=lambda e: len(e.input_ids))
    batches = [collate(train[i : i + 8], tok.pad_token_id) for i in range(8, 256, 32)]
model = apply_olora(model, TrainConfig(output="unused", model=name, method="olora-plus", ratio=0.25).adapter_config())
prepare_for_compute(model, "bf16", "cpu")
model.train()


def step(batch, kernel: str) -> float:
    use_attention(model, kernel)
    t = time.perf_counter()
    with autocast("bf16", "cpu"):
        loss = response_loss(model, **batch)
    loss.backward()
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
