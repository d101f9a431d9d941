"""Probe: one 256-row chunk of the fused LM head + cross-entropy (forward and hidden-state
gradient), the previous element-wise passes against the current ones, with glibc's default
malloc and with freed memory kept (``fast.memory.keep_freed_memory``, in a second process: the
setting cannot be undone). Random bf16 weights at the real head shapes; wall time, 2 threads,
median of 7 after 2 warm-up calls, the two variants alternated.

- previous: fp32 logits, ``logsumexp``, loss, ``sub_``/``exp_`` into the softmax, minus the
  one-hot in place, cast to bf16, matmul;
- current: loss from ``log_softmax`` of the fp32 logits; the gradient as
  ``softmax(bf16 logits) @ W - W[targets]`` (one softmax pass, the one-hot part exactly).
Also each gradient's relative error against fp64 arithmetic on the same bf16 logits.

Run from the repo root: .venv/bin/python -m bench.head_passes_probe
"""
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from oloraplus.fast.memory import keep_freed_memory

SHAPES = {"gemma3-270m": (262144, 640), "smollm2-135m": (49152, 576)}
ROWS = 256


def previous(h, W, t):
    logits = F.linear(h, W).float()
    lse = torch.logsumexp(logits, -1)
    loss = (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
    p = logits.sub_(lse[:, None]).exp_()
    p[torch.arange(len(t)), t] -= 1
    return loss, (p.to(W.dtype) @ W).float()


def current(h, W, t):
    logits = F.linear(h, W)
    loss = -torch.log_softmax(logits.float(), -1).gather(1, t[:, None]).sum()
    return loss, (torch.softmax(logits, -1) @ W).float() - W[t].float()


def median_ms(fn, reps=7):
    fn(), fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[reps // 2]


def measure(memory: str) -> None:
    if memory == "kept":
        keep_freed_memory("cpu")
    for name, (vocab, hidden) in SHAPES.items():
        torch.manual_seed(0)
        W = (torch.randn(vocab, hidden) * 0.02).to(torch.bfloat16)
        h, t = torch.randn(ROWS, hidden).to(torch.bfloat16), torch.randint(0, vocab, (ROWS,))
        (l0, g0), (l1, g1) = previous(h, W, t), current(h, W, t)
        # Reference: the same bf16 logits, everything after them in fp64.
        logits = F.linear(h, W).double()
        ref = (torch.softmax(logits, -1) - F.one_hot(t, vocab).double()) @ W.double()
        err0, err1 = (((g - ref).norm() / ref.norm()).item() for g in (g0.double(), g1.double()))
        runs = {"previous": [], "current": []}
        for _ in range(2):
            runs["previous"].append(median_ms(lambda: previous(h, W, t)))
            runs["current"].append(median_ms(lambda: current(h, W, t)))
        old, new = min(runs["previous"]), min(runs["current"])
        print(f"{name:13s} memory {memory:7s}: previous {old:6.1f} ms, current {new:6.1f} ms, "
              f"{old / new:.2f}x; loss {l0.item():.3f} vs {l1.item():.3f}; gradient error vs fp64 {err0:.1e} vs {err1:.1e}",
              flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        measure(sys.argv[1])
    else:
        for memory in ("default", "kept"):
            subprocess.run([sys.executable, "-m", "bench.head_passes_probe", memory], check=True)
