"""Probe: transparent huge pages for PyTorch's large CPU buffers, one process per setting.

PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first allocation, so each setting needs its own
process; run them alternated from the repo root (bench/NOTES.md, 2026-11-29):
    for i in 1 2 3; do for v in 0 1; do THP_MEM_ALLOC_ENABLE=$v .venv/bin/python -m bench.thp_probe; done; done
Each process: one warm-up step, then the 8 real SmolLM2 batches twice; prints the time, the
minor page faults and how much of the process sits in huge pages.
"""
import os
import resource
import time

import torch

from bench.probe_setup import forward_backward, training_model_and_batches

torch.set_num_threads(2)
model, batches = training_model_and_batches()
forward_backward(model, batches[0])
model.zero_grad(set_to_none=True)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = time.perf_counter()
for _ in range(2):
    for batch in batches:
        forward_backward(model, batch)
        model.zero_grad(set_to_none=True)
seconds = time.perf_counter() - t
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
huge_kb = next(line.split()[1] for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))
print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}: {seconds:.2f} s, "
      f"{faults} minor faults, {huge_kb} kB in huge pages", flush=True)
