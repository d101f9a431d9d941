"""Where a training step's time goes: matmuls, attention, element-wise, optimiser, framework.

Runs ``oloraplus train``'s step (``probe_setup``: OLoRA+ r = 32, bf16, the fast path) on the 8
length-sorted batches of the bench split under ``torch.profiler`` (after one untimed pass, so
that oneDNN's primitives exist), with an AdamW step over the LoRA+ groups after each backward,
and sums the self CPU time of every operator into one category per operator name. The rest of
the wall time (Python, autograd bookkeeping, operators' dispatch outside the kernels) is
"framework". Prints one table; ``python -m bench.profile_probe [MODEL] [--json FILE]``.
Also times the OLoRA+ (ratio 16) against the OLoRA (ratio 1) step with denormals flushed and not.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.harness import overhead_on_batches
from bench.probe_setup import forward_backward, training_model_and_batches
from oloraplus.method.optim import create_optimizer
from oloraplus.training.runtime import autocast

MATMUL = ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "mkldnn", "_linear")
ATTENTION = ("softmax", "_softmax", "scaled_dot_product", "_log_softmax", "masked_fill")
COPY = ("copy_", "to", "_to_copy", "clone", "contiguous", "cat", "stack", "empty", "zeros", "fill_", "index",
        "view", "reshape", "transpose", "t", "permute", "expand", "slice", "select", "split", "narrow", "unsqueeze",
        "squeeze", "as_strided")


def category(name: str) -> str:
    """The category of one aten operator (by its name) for the profile table."""
    op = name.removeprefix("aten::")
    if op in MATMUL or op.startswith("mkldnn"):
        return "matmul"
    if any(op.startswith(a) for a in ATTENTION):
        return "attention (softmax, mask)"
    if op in COPY:
        return "copies, casts, views"
    return "element-wise, reductions, other kernels"


def add_category_seconds(prof, totals: dict[str, float]) -> None:
    """Adds a profile's aten operators' self CPU seconds to ``totals``, by :func:`category`."""
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            cat = category(event.key)
            totals[cat] = totals.get(cat, 0.0) + event.self_cpu_time_total / 1e6


def profile_steps(model, batches, optimizer) -> dict:
    """Forward + backward under the profiler (operators' self CPU time by category, the rest of
    its wall time as framework), the optimiser step timed outside it."""
    for batch in batches:  # untimed: creates every length's oneDNN primitives
        forward_backward(model, batch)
        optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {"optimizer step": 0.0}
    wall = 0.0
    for batch in batches:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            forward_backward(model, batch)
            wall += time.perf_counter() - t
        t = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t
        wall += seconds
        totals["optimizer step"] += seconds
        add_category_seconds(prof, totals)
    totals["framework (Python, autograd, dispatch)"] = max(0.0, wall - sum(totals.values()))
    return {"wall_seconds": wall, "seconds": totals}


def overhead(model, batches, flush: bool) -> float:
    """The bench's OLoRA+ (16) / OLoRA (1) step ratio on these batches, denormals flushed or not."""
    torch.set_flush_denormal(flush)
    try:
        with autocast("bf16", "cpu"):
            return overhead_on_batches(model, batches)["olora_plus_overhead"]
    finally:
        torch.set_flush_denormal(False)


def main(argv: list[str]) -> None:
    name = argv[0] if argv and not argv[0].startswith("--") else "smollm2-135m"
    model, batches = training_model_and_batches(name)
    optimizer = create_optimizer(model, lr=3e-4, ratio=0.25)
    result = profile_steps(model, batches, optimizer)
    wall = result["wall_seconds"]
    print(f"{name}: {len(batches)} steps, {wall:.1f} s")
    for cat, seconds in sorted(result["seconds"].items(), key=lambda kv: -kv[1]):
        print(f"  {cat:45} {seconds:7.2f} s  {100 * seconds / wall:5.1f}%")
    result["olora_plus_overhead"] = {"denormals kept": overhead(model, batches, False),
                                     "denormals flushed": overhead(model, batches, True)}
    print("OLoRA+ (16) / OLoRA (1) step, median of per-batch ratios:", result["olora_plus_overhead"])
    if "--json" in argv:
        with open(argv[argv.index("--json") + 1], "w") as f:
            json.dump({"model": name, **result}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
