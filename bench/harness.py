"""``oloraplus bench``: our training and evaluation stack against the paper's, side by side.

The reference is what the paper describes: a plain ``transformers.Trainer`` with Trainer
defaults (fp32, random batches padded to the longest, loss over the full vocabulary at every
position), PEFT's ``init_lora_weights="olora"`` and ``peft.optimizers.create_loraplus_optimizer``.
Ours is exactly what ``oloraplus train`` runs. Both see the same records (issue 2's split) with
the same seeds and batch size. Each training runs in its own child process so that each peak
RSS is its own; the children run one after another inside one ``bench`` invocation. Both stacks
train once on each of ``orders`` data orders (seeds), alternately (ours, reference, ours, ...), so
that a slower or faster spell of the machine falls on both; the speed-up is the ratio of the two
medians over the orders.

Reported (printed as a table and written as JSON):
- ``train``: useful (non-pad) tokens/s of both (median and per order) and peak RSS,
  ``speedup`` = ours / reference (medians), and both eval losses (same fp32 eval code for both)
  after the same records, per order;
- ``olora_plus_overhead``: our step time at ratio 16 over ratio 1, steps interleaved;
- ``init``: whole-model OLoRA init time, ours vs PEFT's;
- ``generation``: new tokens/s of our batched greedy generation vs a one-prompt-at-a-time
  ``model.generate`` loop on the same (merged, fp32) model, and the share of identical outputs;
  ``eval_loss_tokens_per_second`` of our eval-loss pass;
- ``roofline_fraction``: our useful training FLOP/s (counted with torch's FlopCounterMode on
  unpadded sequences: the body at every token, the LM head where a response token is
  predicted) over the bf16 matmul peak measured in the same run.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from oloraplus.data.records import DEFAULT_DATA
from oloraplus.errors import UserError


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    data: str = DEFAULT_DATA
    n_train: int = 256
    n_eval: int = 64
    batch_size: int = 8
    ratio: float = 0.25
    seed: int = 0
    data_seed: int = 42
    max_length: int = 512
    orders: int = 3  # data orders (seeds): each stack trains once on each, for the medians and spreads
    generation_prompts: int = 64
    max_new_tokens: int = 64


def split_examples(cfg: BenchConfig, tokenizer):
    from oloraplus.data.records import load_records
    from oloraplus.data.split import split_records
    from oloraplus.data.tokenize import tokenize_records

    split = split_records(load_records(cfg.data), cfg.n_train, cfg.n_eval, cfg.data_seed)
    train, _ = tokenize_records(split.train, tokenizer, cfg.max_length)
    evals, _ = tokenize_records(split.eval, tokenizer, cfg.max_length)
    return split, train, evals


def _eval_loss(merged, examples, pad_id) -> float:
    """The same eval-loss code for both stacks, on the model ``training.runtime.merged_for_eval`` returns."""
    from oloraplus.evaluation.evaluate import eval_loss

    return eval_loss(merged, examples, pad_id, batch_size=8, progress=False)["eval_loss"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_reference(cfg: BenchConfig, seed: int) -> dict:
    """Plain Trainer + PEFT OLoRA + PEFT's LoRA+ optimiser, Trainer defaults."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer, TrainingArguments, set_seed

    from oloraplus.data.batching import Collator, ExampleDataset
    from oloraplus.models.families import default_target_modules
    from oloraplus.models.loading import load_model
    from oloraplus.training.runtime import merged_for_eval

    model, tokenizer = load_model(cfg.model)
    _, train, evals = split_examples(cfg, tokenizer)
    set_seed(seed)
    config = LoraConfig(r=32, lora_alpha=16, target_modules=default_target_modules(model),
                        init_lora_weights="olora", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=3e-4, loraplus_lr_ratio=cfg.ratio)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=cfg.batch_size, num_train_epochs=1,
                                 learning_rate=3e-4, seed=seed, use_cpu=True, report_to=[], save_strategy="no",
                                 remove_unused_columns=False, disable_tqdm=True, logging_strategy="no")
        trainer = Trainer(model=model, args=args, train_dataset=ExampleDataset(train),
                          data_collator=Collator(tokenizer.pad_token_id), optimizers=(optimizer, None))
        t = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t
    tokens = sum(len(e.input_ids) for e in train)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "eval_loss": _eval_loss(merged_for_eval(model), evals, tokenizer.pad_token_id),
            "peak_rss_mb": _peak_rss_mb()}


def child_ours(cfg: BenchConfig, seed: int, measure_all: bool = True) -> dict:
    """``oloraplus train``'s pipeline and the eval loss; then (``measure_all``) the overhead,
    generation and FLOP measurements, which the repeats over data orders skip."""
    from transformers import set_seed

    from oloraplus.fast.precision import prepare_for_compute
    from oloraplus.method.adapters import apply_olora
    from oloraplus.models.loading import default_device
    from oloraplus.training.config import TrainConfig
    from oloraplus.training.recipe import build_trainer, load_base_model
    from oloraplus.training.runtime import autocast, merged_for_eval

    tc = TrainConfig(output="unused", model=cfg.model, data=cfg.data, method="olora-plus", ratio=cfg.ratio,
                     n_train=cfg.n_train, n_eval=cfg.n_eval, seed=seed, batch_size=cfg.batch_size,
                     progress=False)
    device = default_device()
    model, tokenizer, precision = load_base_model(tc, device)  # the reference keeps glibc's malloc defaults
    _, train, evals = split_examples(cfg, tokenizer)
    set_seed(seed)
    model = apply_olora(model, tc.adapter_config())
    prepare_for_compute(model, precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(tc, model, tokenizer, train, Path(tmp), precision, device)
        t = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t
    tokens = sum(len(e.input_ids) for e in train)
    result = {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
              "precision": precision, "peak_rss_mb": _peak_rss_mb()}
    if measure_all:
        with autocast(precision, device):
            result["overhead"] = _overhead(model, train, tokenizer.pad_token_id, cfg)
            result["flops_per_token"] = _useful_flops_per_token(model, train[:16])
    model = merged_for_eval(model)  # what `oloraplus train` evaluates: merged, fp32
    result["eval_loss"] = _eval_loss(model, evals, tokenizer.pad_token_id)
    if not measure_all:
        return result
    result["generation"] = _generation(model, tokenizer, evals, cfg, tc.generation_batch_size)
    result["eval_pass"] = _eval_pass(model, evals, tokenizer.pad_token_id)
    return result


def _overhead(model, examples, pad_id, cfg: BenchConfig, steps: int = 8) -> dict:
    """Step time with ratio 16 vs ratio 1 on the same batches, interleaved step by step.

    Each batch is stepped once untimed first: the first step at a new length pays oneDNN's
    creation of that shape's matmul primitives (about 0.14 s a step on a Zen 5 host), which
    would otherwise fall on whichever ratio ran first. The two ratios also take turns going first,
    and the overhead is the median of the per-batch ratios: the batches differ in length, and a
    ratio of medians over so few of them moved by 6% with the machine's noise alone.
    """
    from oloraplus.data.batching import collate
    from oloraplus.method.loss import response_loss
    from oloraplus.method.optim import create_optimizer

    model.train()
    starts = [(k * cfg.batch_size) % max(1, len(examples) - cfg.batch_size + 1) for k in range(steps)]
    batches = [collate(examples[i : i + cfg.batch_size], pad_id) for i in starts]
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    times = {1.0: [], 16.0: []}
    optimizers = {r: create_optimizer(model, lr=3e-4, ratio=r) for r in times}
    for k, batch in enumerate(batches):
        response_loss(model, **batch).backward()  # untimed: creates this length's primitives
        model.zero_grad(set_to_none=True)
        for ratio, opt in sorted(optimizers.items(), reverse=k % 2 == 1):
            t = time.perf_counter()
            loss = response_loss(model, **batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[ratio].append(time.perf_counter() - t)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])
    median = {r: statistics.median(v) for r, v in times.items()}
    pairs = [t16 / t1 for t1, t16 in zip(times[1.0], times[16.0])]
    return {"step_seconds_ratio1": median[1.0], "step_seconds_ratio16": median[16.0],
            "olora_plus_overhead": statistics.median(pairs)}


def _useful_flops_per_token(model, examples) -> float:
    """FLOPs of forward+backward per useful token, counted on unpadded single sequences."""
    from torch.utils.flop_counter import FlopCounterMode

    from oloraplus.data.batching import collate
    from oloraplus.method.loss import response_loss

    model.train()
    total_flops, total_tokens = 0, 0
    for e in examples:
        batch = collate([e], 0)
        with FlopCounterMode(display=False) as counter:
            response_loss(model, **batch).backward()
        model.zero_grad(set_to_none=True)
        total_flops += counter.get_total_flops()
        total_tokens += len(e.input_ids)
    return total_flops / total_tokens


def _generation(model, tokenizer, examples, cfg: BenchConfig, batch_size: int) -> dict:
    from oloraplus.evaluation.generation import generate_responses, stop_token_ids, until_eos

    prompts = [e.input_ids[: e.prompt_len] for e in examples[: cfg.generation_prompts]]
    t = time.perf_counter()
    ours, ours_tokens = generate_responses(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=batch_size, progress=False)
    ours_seconds = time.perf_counter() - t
    eos = stop_token_ids(model, tokenizer)
    loop, loop_tokens = [], 0
    t = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            tokens = until_eos(out[0, len(p):].tolist(), eos)
            loop_tokens += len(tokens)
            loop.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    loop_seconds = time.perf_counter() - t
    same = sum(a == b for a, b in zip(ours, loop)) / len(prompts)
    return {"ours_tokens_per_second": ours_tokens / ours_seconds, "loop_tokens_per_second": loop_tokens / loop_seconds,
            "speedup": (ours_tokens / ours_seconds) / (loop_tokens / loop_seconds), "identical_share": same,
            "prompts": len(prompts), "ours_new_tokens": ours_tokens, "loop_new_tokens": loop_tokens}


def _eval_pass(model, examples, pad_id) -> dict:
    from oloraplus.evaluation.evaluate import eval_loss

    t = time.perf_counter()
    eval_loss(model, examples, pad_id, batch_size=8, progress=False)
    seconds = time.perf_counter() - t
    tokens = sum(len(e.input_ids) for e in examples)
    return {"tokens_per_second": tokens / seconds, "seconds": seconds}


def child_init(cfg: BenchConfig, repeats: int = 3) -> dict:
    """Whole-model OLoRA init: ours (QR of W's first r columns) vs PEFT's (full QR)."""
    from peft import LoraConfig, get_peft_model

    from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora
    from oloraplus.models.families import default_target_modules
    from oloraplus.models.loading import load_model

    base, _ = load_model(cfg.model)
    times = {"ours": [], "peft": []}
    for _ in range(repeats):
        m = copy.deepcopy(base)
        t = time.perf_counter()
        apply_olora(m, OLoRAPlusConfig())
        times["ours"].append(time.perf_counter() - t)
        m = copy.deepcopy(base)
        t = time.perf_counter()
        get_peft_model(m, LoraConfig(r=32, lora_alpha=16, target_modules=default_target_modules(m),
                                     init_lora_weights="olora", task_type="CAUSAL_LM"))
        times["peft"].append(time.perf_counter() - t)
    ours, peft = statistics.median(times["ours"]), statistics.median(times["peft"])
    return {"ours_seconds": ours, "peft_seconds": peft, "speedup": peft / ours}


def child_peak() -> dict:
    """Best bf16 and fp32 matmul throughput of this machine, all threads."""
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        n = 2048
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(3):
            a @ b
        best = min(_timed(lambda: a @ b) for _ in range(10))
        out[f"{name}_gflops"] = 2 * n**3 / best / 1e9
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


CHILDREN = {"reference": child_reference, "ours": child_ours, "init": child_init, "peak": child_peak}


def _run_child(kind: str, cfg: BenchConfig, **kwargs) -> dict:
    """Run one measurement in a fresh interpreter; its peak RSS is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    payload = json.dumps({"kind": kind, "config": asdict(cfg), "kwargs": kwargs, "out": out_path})
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    root = str(Path(__file__).resolve().parents[1])  # the checkout: bench/ is not an installed package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "bench.harness", payload], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        os.unlink(out_path)
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise UserError(f"bench: the '{kind}' measurement of {cfg.model} failed: {lines[-1] if lines else proc.returncode}")
    result = json.loads(Path(out_path).read_text())
    os.unlink(out_path)
    return result


def machine() -> dict:
    """The CPU, as exactly as /proc/cpuinfo names it: hosts that all call themselves "AMD EPYC"
    differ by generation (AMD family 25 is Zen 3 or 4, 26 is Zen 5; the Zen 5 host here
    measured 2.2x the bf16 matmul rate of the earlier one)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    info = {}
    for line in flags.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return {"cpu": info.get("model name") or platform.processor(), "cpu_family": info.get("cpu family"),
            "cpu_model": info.get("model"), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def _check_inputs(models: list[str], data: str, output: str, n_records: int) -> None:
    """Fail in one line before any measurement: unknown model, unusable data, unwritable output."""
    from oloraplus.data.records import load_records
    from oloraplus.models.loading import resolve_model
    from oloraplus.outputs import check_output_file

    # empty, a folder, a path under a file, too long, a dangling link, the data file itself, or a
    # folder that cannot be written (probed): refused now, not after the measurements
    check_output_file(output, inputs=[data, *models])
    for name in models:
        resolve_model(name)
    source = load_records(data)
    if len(source.records) < n_records:
        raise UserError(f"bench needs at least {n_records} records; {data} has {len(source.records)}")


def run_bench(models: list[str], quick: bool, output: str, data: str, sizes: dict | None = None) -> dict:
    """Measure each model (``sizes`` overrides BenchConfig's sizes, for tests) and write ``output``."""
    from oloraplus.training.provenance import library_versions

    # Generation is measured on one full batch of evaluation prompts (64, the batch size
    # `oloraplus train` generates with), so that the bench sees the batching a real run uses.
    sizes = {"n_train": 128 if quick else 256, "n_eval": 64, "generation_prompts": 64,
             "orders": 1 if quick else 3, **(sizes or {})}
    _check_inputs(models, data, output, sizes["n_train"] + sizes["n_eval"])
    start = time.perf_counter()
    # The 1/5/15-minute load averages before and after: other work on the machine slows
    # either side and makes the ratios noisy, so a result says how quiet the machine was.
    results = {"machine": machine(), "versions": library_versions(), "quick": quick, "models": {},
               "load_average": {"start": os.getloadavg()}}
    m = results["machine"]
    print(f"machine: {m['cpu']} (family {m['cpu_family']}, model {m['cpu_model']}), {m['cores']} cores", flush=True)
    peak = _run_child("peak", BenchConfig())
    results["peak"] = peak
    print(f"bf16 matmul peak {peak['bf16_gflops']:.0f} GFLOP/s, fp32 {peak['fp32_gflops']:.0f} GFLOP/s", flush=True)
    for name in models:
        cfg = BenchConfig(model=name, data=data, **sizes)
        print(f"[{name}] init ...", flush=True)
        init = _run_child("init", cfg)
        runs = {"ours": [], "reference": []}
        for k in range(cfg.orders):
            for kind in runs:
                print(f"[{name}] {kind} (data order {k}): training {cfg.n_train} records ...", flush=True)
                extra = {"measure_all": k == 0} if kind == "ours" else {}
                runs[kind].append(_run_child(kind, cfg, seed=cfg.seed + k, **extra))
        ours, ref = runs["ours"][0], runs["reference"][0]
        # The reference's speed depends on its data order (random batches pad differently), and
        # both depend on how busy the machine is: the speed-up is the ratio of the medians.
        speeds = {kind: [r["tokens_per_second"] for r in rs] for kind, rs in runs.items()}
        losses = {kind: [r["eval_loss"] for r in rs] for kind, rs in runs.items()}
        ours_speed, ref_speed = statistics.median(speeds["ours"]), statistics.median(speeds["reference"])
        flops = ours["flops_per_token"] * ours_speed
        results["models"][name] = {
            "config": asdict(cfg),
            "train": {
                "reference_tokens_per_second": ref_speed,
                "reference_tokens_per_second_orders": speeds["reference"],
                "ours_tokens_per_second": ours_speed,
                "ours_tokens_per_second_orders": speeds["ours"],
                "speedup": ours_speed / ref_speed,
                "speedup_orders": [o / r for o, r in zip(speeds["ours"], speeds["reference"])],
                "reference_peak_rss_mb": ref["peak_rss_mb"], "ours_peak_rss_mb": ours["peak_rss_mb"],
                "reference_eval_loss": ref["eval_loss"], "ours_eval_loss": ours["eval_loss"],
                "eval_loss_rel_diff": abs(ours["eval_loss"] - ref["eval_loss"]) / ref["eval_loss"],
                "reference_eval_loss_orders": losses["reference"],
                "reference_eval_loss_spread": _spread(losses["reference"]),
                "ours_eval_loss_orders": losses["ours"],
                "ours_eval_loss_spread": _spread(losses["ours"]),
                "ours_precision": ours["precision"],
            },
            "olora_plus_overhead": ours["overhead"]["olora_plus_overhead"],
            "overhead": ours["overhead"],
            "init": init,
            "generation": ours["generation"],
            "eval_loss_tokens_per_second": ours["eval_pass"]["tokens_per_second"],
            "useful_flops_per_token": ours["flops_per_token"],
            "useful_gflops": flops / 1e9,
            "roofline_fraction": flops / (peak["bf16_gflops"] * 1e9),
        }
        print_table({name: results["models"][name]})
    results["wall_seconds"] = time.perf_counter() - start
    results["load_average"]["end"] = os.getloadavg()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    from oloraplus.files import write_json_atomic

    write_json_atomic(output, results)
    print(f"wrote {output} ({results['wall_seconds'] / 60:.1f} min)")
    return results


def _spread(values: list[float]) -> float:
    """(max - min) / mean: the relative spread of a measurement over the data orders."""
    return (max(values) - min(values)) / statistics.mean(values)


def print_table(models: dict) -> None:
    for name, r in models.items():
        t, g = r["train"], r["generation"]
        rows = [
            ("train tokens/s (useful)", f"{t['reference_tokens_per_second']:.0f}", f"{t['ours_tokens_per_second']:.0f}", f"{t['speedup']:.2f}x"),
            ("  per data order", _joined(t["reference_tokens_per_second_orders"]),
             _joined(t["ours_tokens_per_second_orders"]), _joined(t["speedup_orders"], "{:.2f}")),
            ("train peak RSS MB", f"{t['reference_peak_rss_mb']:.0f}", f"{t['ours_peak_rss_mb']:.0f}", ""),
            ("eval loss after training", f"{t['reference_eval_loss']:.4f}", f"{t['ours_eval_loss']:.4f}", f"{100 * t['eval_loss_rel_diff']:.2f}% apart"),
            ("OLoRA init s", f"{r['init']['peft_seconds']:.2f}", f"{r['init']['ours_seconds']:.2f}", f"{r['init']['speedup']:.2f}x"),
            ("generation new tokens/s", f"{g['loop_tokens_per_second']:.1f}", f"{g['ours_tokens_per_second']:.1f}", f"{g['speedup']:.2f}x, {100 * g['identical_share']:.0f}% identical"),
            ("eval-loss pass tokens/s", "", f"{r['eval_loss_tokens_per_second']:.0f}", ""),
            ("OLoRA+ (16) / OLoRA (1) step", "", f"{r['olora_plus_overhead']:.3f}", ""),
            ("roofline fraction (bf16)", "", f"{r['roofline_fraction']:.3f}", f"{r['useful_gflops']:.0f} GFLOP/s"),
        ]
        print(f"\n{name}")
        print(f"{'measure':32} {'reference':>16} {'ours':>16}  ratio")
        for row in rows:
            print(f"{row[0]:32} {row[1]:>16} {row[2]:>16}  {row[3]}")
        print(flush=True)


def _joined(values: list[float], fmt: str = "{:.0f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


if __name__ == "__main__":
    payload = json.loads(sys.argv[1])
    cfg = BenchConfig(**payload["config"])
    kind = payload["kind"]
    result = CHILDREN[kind]() if kind == "peak" else CHILDREN[kind](cfg, **payload["kwargs"])
    Path(payload["out"]).write_text(json.dumps(result))
