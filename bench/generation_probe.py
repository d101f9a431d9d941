"""Where batched greedy generation's time goes, and decoding variants side by side.

The bench's generation measurement (64 eval prompts of its split, 64 new tokens, one batch of 64, fp32)
on the base model (the bench generates with its trained, merged one) with
:func:`oloraplus.evaluation.generation.generate_responses`: first under ``torch.profiler`` (operators'
self CPU time by ``bench.profile_probe``'s categories, the rest of the wall time as framework), then
each variant timed ``--repeats`` times, alternated, its outputs compared with the default's, and with
``--loop N`` the bench's one-prompt-at-a-time baseline N times between them.
``python -m bench.generation_probe [MODEL] [--json FILE] [--repeats N] [--loop N] [--only VARIANT ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

from bench.harness import (
    BenchConfig,
    identical_share,
    one_prompt_at_a_time,
    split_examples,
)
from bench.profile_probe import add_category_seconds
from oloraplus.evaluation import generation
from oloraplus.models.loading import load_model


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@contextmanager
def _attention(model, kernel: str):
    from oloraplus.fast.attention import current_attention, use_attention

    old = current_attention(model)
    use_attention(model, kernel)
    try:
        yield
    finally:
        use_attention(model, old)


@contextmanager
def _dynamic_cache():
    """transformers' own DynamicCache (concatenation per step) in place of the preallocated one."""
    from transformers import DynamicCache

    old = generation.preallocated_cache
    generation.preallocated_cache = lambda model, capacity: DynamicCache(config=model.config)
    try:
        yield
    finally:
        generation.preallocated_cache = old


@contextmanager
def _no_grad():
    """``torch.no_grad`` in place of ``torch.inference_mode`` around the decoding."""
    old = generation.generate_responses, generation.greedy_decode
    generation.generate_responses = torch.no_grad()(old[0].__wrapped__)
    generation.greedy_decode = torch.no_grad()(old[1].__wrapped__)
    try:
        yield
    finally:
        generation.generate_responses, generation.greedy_decode = old


@contextmanager
def _before():
    """The decoding before the preallocated cache and inference mode (commit a0f36d8)."""
    with _dynamic_cache(), _no_grad():
        yield


def variants(model) -> dict:
    """name -> a context manager factory under which generation runs that way."""
    from oloraplus.fast.attention import GROUPED

    return {
        "default": contextmanager(lambda: (yield)),
        "sdpa_gqa": lambda: _env("TRANSFORMERS_SDPA_FORCE_GQA", "1"),
        "grouped": lambda: _attention(model, GROUPED),
        "dynamic_cache": _dynamic_cache,
        "no_grad": _no_grad,
        "before": _before,
    }


def run(model, tok, prompts, cfg) -> tuple[list[str], int, float]:
    t = time.perf_counter()
    out, n = generation.generate_responses(model, tok, prompts, cfg.max_new_tokens, batch_size=len(prompts), progress=False)
    return out, n, time.perf_counter() - t


def profiled(model, tok, prompts, cfg) -> tuple[list[str], dict, float]:
    """One generation under ``torch.profiler``: its texts, seconds by category, wall seconds."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        texts, n, wall = run(model, tok, prompts, cfg)
    seconds: dict[str, float] = {}
    add_category_seconds(prof, seconds)
    seconds["framework (Python, dispatch)"] = max(0.0, wall - sum(seconds.values()))
    print(f"profiled: {n} new tokens in {wall:.2f} s")
    for c, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {c:40s} {s:7.2f} s  {100 * s / wall:5.1f}%")
    for s, k, count in sorted(((e.self_cpu_time_total / 1e6, e.key, e.count) for e in prof.key_averages()),
                              reverse=True)[:15]:
        print(f"    {k:40s} {s:7.2f} s  {count} calls")
    return texts, seconds, wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--max-new-tokens", type=int, default=BenchConfig.max_new_tokens)
    parser.add_argument("--loop", type=int, default=0,
                        help="also time the bench's one-prompt-at-a-time baseline this many times")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--prompts", type=int, default=BenchConfig.generation_prompts)
    args = parser.parse_args()
    cfg = BenchConfig(model=args.model, max_new_tokens=args.max_new_tokens)
    model, tok = load_model(args.model)
    model = model.float().eval()
    _, _, evals = split_examples(cfg, tok)
    prompts = [e.input_ids[: e.prompt_len] for e in evals[: args.prompts]]
    generation.generate_responses(model, tok, prompts[:8], 4, batch_size=8, progress=False)  # warm-up
    result = {"model": args.model, "prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens,
              "threads": torch.get_num_threads()}
    if args.no_profile:
        reference, _, _ = run(model, tok, prompts, cfg)
    else:
        reference, result["profile_seconds"], result["profile_wall"] = profiled(model, tok, prompts, cfg)
    chosen = {k: v for k, v in variants(model).items() if not args.only or k in args.only or k == "default"}
    times: dict[str, list[float]] = {k: [] for k in chosen}
    same: dict[str, float] = {}
    loop: list[float] = []
    for r in range(max(args.repeats, args.loop)):
        if r < args.loop:
            texts, n, s = one_prompt_at_a_time(model, tok, prompts, cfg.max_new_tokens)
            loop.append(n / s)
            same["loop"] = identical_share(texts, reference)
        for name in (list(chosen) if r % 2 == 0 else list(reversed(chosen))) if r < args.repeats else []:
            with chosen[name]():
                out, n, s = run(model, tok, prompts, cfg)
            times[name].append(n / s)
            same[name] = identical_share(out, reference)
    result |= {"tokens_per_second": times, "identical_share": same}
    if loop:
        result["loop_tokens_per_second"] = loop
        print(f"{'loop':13s} {statistics.median(loop):7.1f} new tok/s ({' '.join(f'{t:.1f}' for t in loop)})  "
              f"identical to default {same['loop']:.0%}")
    for name in chosen:
        med = statistics.median(times[name])
        vs_loop = f"  {med / statistics.median(loop):.2f}x the loop" if loop else ""
        print(f"{name:13s} {med:7.1f} new tok/s ({' '.join(f'{t:.1f}' for t in times[name])})  "
              f"x{med / statistics.median(times['default']):.3f}  identical {same[name]:.0%}{vs_loop}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
