"""``oloraplus bench``: our training and evaluation stack against the paper's, side by side.

Three stacks train on the same records (the split of ``oloraplus train``) with the same seeds
and batch size:

- the reference, what the paper describes: a plain ``transformers.Trainer`` at its defaults (fp32,
  random batches padded to the longest, loss over the full vocabulary at every position),
  PEFT's ``init_lora_weights="olora"`` and ``peft.optimizers.create_loraplus_optimizer``;
- the configured Trainer: the same, set up as a user who knows the Trainer would: bf16 autocast
  where the CPU has native bf16 (``bf16=True``), ``train_sampling_strategy="group_by_length"``,
  SDPA attention;
- ours: exactly what ``oloraplus train`` runs.

Each training runs in its own child process, so that each peak RSS is its own; the children run
one after another inside one ``bench`` invocation. The stacks train once on each of ``orders``
data orders (seeds), alternately (ours, configured, reference, ours, ...), so that a slower or
faster spell of the machine falls on all; a speed-up is the ratio of two medians over the orders.

Reported (printed as a table and written as JSON):
- ``train``: useful (non-pad) tokens/s of each stack (median and per order), peak RSS (whole
  process, and during training alone), ``speedup`` = ours / reference and
  ``speedup_vs_configured`` = ours / configured (medians), and the eval losses (the same fp32
  eval code for all) after the same records, per order;
- ``olora_plus_overhead``: our step time at ratio 16 over ratio 1, steps interleaved;
- ``init``: whole-model OLoRA init time, ours vs PEFT's;
- ``generation``: new tokens/s of our batched greedy generation vs a one-prompt-at-a-time
  ``model.generate`` loop on the same (merged, fp32) model, and the share of identical outputs;
  ``eval_loss_tokens_per_second`` of our eval-loss pass;
- ``roofline_fraction``: our useful training FLOP/s (counted with torch's FlopCounterMode on
  unpadded sequences: the body at every token, the LM head where a response token is
  predicted) over the bf16 matmul peak measured in the same run;
- ``paper_size`` (``--paper-size``): a model of TinyLlama-1.1B's published shape with random
  weights (no download) and a 32,000-token BPE tokenizer trained on the records, a few steps of
  each stack with and without gradient checkpointing: tokens/s and peak RSS during training.
"""

from __future__ import annotations

import contextlib
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
from oloraplus.fast.memory import HUGE_PAGES_ENV, use_huge_page_allocations


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
    """Peak RSS of this process so far, in MB (across :func:`_reset_peak_rss`)."""
    return max(_PEAK_BEFORE_RESET[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


_PEAK_BEFORE_RESET = [0.0]


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5), so that a later
    :func:`_vm_hwm_mb` is the peak since now: the training's own peak, not the loading's.
    The reset also resets ``getrusage``'s peak, so the peak so far is kept for :func:`_peak_rss_mb`."""
    _PEAK_BEFORE_RESET[0] = max(_PEAK_BEFORE_RESET[0], _peak_rss_mb())
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    """Peak RSS of this process since the last :func:`_reset_peak_rss` (``VmHWM``), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


STACKS = ("ours", "configured", "reference")


def child_reference(cfg: BenchConfig, seed: int, configured: bool = False, gradient_checkpointing: bool = False,
                    evaluate: bool = True) -> dict:
    """Plain Trainer + PEFT OLoRA + PEFT's LoRA+ optimiser: at the Trainer's defaults, or
    ``configured`` (bf16 autocast where the CPU has native bf16, length-grouped batches, SDPA)."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer, TrainingArguments, set_seed

    from oloraplus.data.batching import Collator, ExampleDataset
    from oloraplus.models.families import default_target_modules
    from oloraplus.models.loading import load_model
    from oloraplus.training.runtime import merged_for_eval, resolve_precision

    model, tokenizer = load_model(cfg.model)
    bf16 = configured and resolve_precision("auto", "cpu") == "bf16"
    if configured:
        model.set_attn_implementation("sdpa")
    _, train, evals = split_examples(cfg, tokenizer)
    set_seed(seed)
    config = LoraConfig(r=32, lora_alpha=16, target_modules=default_target_modules(model),
                        init_lora_weights="olora", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=3e-4, loraplus_lr_ratio=cfg.ratio)
    options = {}
    if configured:
        options.update(bf16=bf16, train_sampling_strategy="group_by_length")
    if gradient_checkpointing:
        options.update(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=cfg.batch_size, num_train_epochs=1,
                                 learning_rate=3e-4, seed=seed, use_cpu=True, report_to=[], save_strategy="no",
                                 remove_unused_columns=False, disable_tqdm=True, logging_strategy="no", **options)
        trainer = Trainer(model=model, args=args, train_dataset=ExampleDataset(train),
                          data_collator=Collator(tokenizer.pad_token_id), optimizers=(optimizer, None))
        seconds, train_peak = _train_timed(trainer)
    tokens = sum(len(e.input_ids) for e in train)
    result = {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
              "precision": "bf16" if bf16 else "fp32", "attention": model.config._attn_implementation,
              "peak_rss_mb": _peak_rss_mb(), "train_peak_rss_mb": train_peak}
    if evaluate:
        result["eval_loss"] = _eval_loss(merged_for_eval(model), evals, tokenizer.pad_token_id)
    return result


def _train_timed(trainer) -> tuple[float, float | None]:
    """``trainer.train()``: its wall seconds and the peak RSS (MB) during it, None where the peak
    cannot be reset on this system."""
    reset = _reset_peak_rss()
    seconds = _timed(trainer.train)
    return seconds, (_vm_hwm_mb() if reset else None)


def child_configured(cfg: BenchConfig, seed: int, **kwargs) -> dict:
    """The Trainer as a competent user configures it (:func:`child_reference` with ``configured``)."""
    return child_reference(cfg, seed, configured=True, **kwargs)


def child_ours(cfg: BenchConfig, seed: int, measure_all: bool = True, gradient_checkpointing: bool = False,
               evaluate: bool = True, group_by_length: bool = True) -> dict:
    """``oloraplus train``'s pipeline and the eval loss; then (``measure_all``) the overhead,
    generation and FLOP measurements, which the repeats over data orders skip.
    ``group_by_length=False``: random batches (``--no-group-by-length``; ``bench/grouping_probe.py``)."""
    from transformers import set_seed

    from oloraplus.method.adapters import apply_olora
    from oloraplus.models.loading import default_device
    from oloraplus.training.config import TrainConfig
    from oloraplus.training.recipe import build_trainer, load_base_model, prepare_for_training
    from oloraplus.training.runtime import autocast, merged_for_eval

    tc = TrainConfig(output="unused", model=cfg.model, data=cfg.data, method="olora-plus", ratio=cfg.ratio,
                     n_train=cfg.n_train, n_eval=cfg.n_eval, seed=seed, batch_size=cfg.batch_size,
                     progress=False, gradient_checkpointing=gradient_checkpointing, group_by_length=group_by_length)
    device = default_device()
    model, tokenizer, precision = load_base_model(tc, device)  # the reference keeps glibc's malloc defaults
    _, train, evals = split_examples(cfg, tokenizer)
    set_seed(seed)
    model = apply_olora(model, tc.adapter_config())
    prepare_for_training(model, tc, precision, device)  # as `oloraplus train` does
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(tc, model, tokenizer, train, Path(tmp), precision, device)
        seconds, train_peak = _train_timed(trainer)
    tokens = sum(len(e.input_ids) for e in train)
    result = {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
              "precision": precision, "peak_rss_mb": _peak_rss_mb(), "train_peak_rss_mb": train_peak}
    if not evaluate:
        return result
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


def _overhead(model, examples, pad_id, cfg: BenchConfig, steps: int = 16) -> dict:
    """Step time with ratio 16 vs ratio 1 on ``steps`` batches of ``examples`` (:func:`overhead_on_batches`).

    With 8 batches the median of the per-batch ratios still moved by up to 11% from run to run;
    16 halve that (``bench/overhead_probe.py``, bench/NOTES.md).
    """
    from oloraplus.data.batching import collate

    starts = [(k * cfg.batch_size) % max(1, len(examples) - cfg.batch_size + 1) for k in range(steps)]
    return overhead_on_batches(model, [collate(examples[i : i + cfg.batch_size], pad_id) for i in starts])


def overhead_on_batches(model, batches: list[dict]) -> dict:
    """Step time with ratio 16 vs ratio 1 on the same batches, interleaved step by step.

    Each batch is stepped once untimed first: the first step at a new length pays oneDNN's
    creation of that shape's matmul primitives (about 0.14 s a step on a Zen 5 host), which
    would otherwise fall on whichever ratio ran first. The two ratios also take turns going first,
    and the overhead is the median of the per-batch ratios: the batches differ in length, and a
    ratio of medians over so few of them moved by 6% with the machine's noise alone. The trainable
    parameters are restored afterwards. Runs under the caller's autocast.
    """
    from oloraplus.method.loss import response_loss
    from oloraplus.method.optim import create_optimizer

    model.train()
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
    from oloraplus.evaluation.generation import generate_responses

    prompts = [e.input_ids[: e.prompt_len] for e in examples[: cfg.generation_prompts]]
    t = time.perf_counter()
    ours, ours_tokens = generate_responses(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=batch_size, progress=False)
    ours_seconds = time.perf_counter() - t
    loop, loop_tokens, loop_seconds = one_prompt_at_a_time(model, tokenizer, prompts, cfg.max_new_tokens)
    same = identical_share(ours, loop)
    return {"ours_tokens_per_second": ours_tokens / ours_seconds, "loop_tokens_per_second": loop_tokens / loop_seconds,
            "speedup": (ours_tokens / ours_seconds) / (loop_tokens / loop_seconds), "identical_share": same,
            "prompts": len(prompts), "ours_new_tokens": ours_tokens, "loop_new_tokens": loop_tokens}


def identical_share(texts: list[str], reference: list[str]) -> float:
    """The share of ``texts`` equal to ``reference``, position by position."""
    return sum(a == b for a, b in zip(texts, reference)) / len(reference)


def one_prompt_at_a_time(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[str], int, float]:
    """The generation baseline: greedy ``model.generate`` on one prompt at a time.
    Returns the texts, the new tokens (up to and including EOS) and the seconds taken."""
    from oloraplus.evaluation.generation import stop_token_ids, until_eos

    eos = stop_token_ids(model, tokenizer)
    texts, new_tokens = [], 0
    t = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            tokens = until_eos(out[0, len(p):].tolist(), eos)
            new_tokens += len(tokens)
            texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return texts, new_tokens, time.perf_counter() - t


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


CHILDREN = {"reference": child_reference, "configured": child_configured, "ours": child_ours, "init": child_init,
            "peak": child_peak}


def _run_child(kind: str, cfg: BenchConfig, **kwargs) -> dict:
    """Run one measurement in a fresh interpreter; its peak RSS is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    payload = json.dumps({"kind": kind, "config": asdict(cfg), "kwargs": kwargs, "out": out_path})
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    root = str(Path(__file__).resolve().parents[1])  # the checkout: bench/ is not an installed package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    if kind == "ours":
        use_huge_page_allocations(env)  # as the `oloraplus` command runs (a value already set is kept)
    else:
        env.pop(HUGE_PAGES_ENV, None)  # the Trainer columns as a user runs them
    proc = subprocess.run([sys.executable, "-m", "bench.harness", payload], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        os.unlink(out_path)
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise UserError(f"bench: the '{kind}' measurement of {cfg.model} failed: {lines[-1] if lines else proc.returncode}")
    result = json.loads(Path(out_path).read_text())
    os.unlink(out_path)
    result["huge_page_allocations"] = env.get(HUGE_PAGES_ENV) == "1"  # the child's environment
    return result


def machine() -> dict:
    """The host (``training.provenance.host``) with the thread count and versions the bench ran with."""
    from oloraplus.training.provenance import host

    return {**host(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


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


def run_bench(models: list[str], quick: bool, output: str, data: str, sizes: dict | None = None,
              paper_size: dict | None = None) -> dict:
    """Measure each model (``sizes`` overrides BenchConfig's sizes, for tests) and write ``output``;
    ``paper_size`` (:data:`PAPER_SIZE` or a smaller shape, for tests) adds the paper-size rows."""
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
        runs = {kind: [] for kind in STACKS}
        for k in range(cfg.orders):
            for kind in runs:
                print(f"[{name}] {kind} (data order {k}): training {cfg.n_train} records ...", flush=True)
                extra = {"measure_all": k == 0} if kind == "ours" else {}
                runs[kind].append(_run_child(kind, cfg, seed=cfg.seed + k, **extra))
        ours = runs["ours"][0]
        results["models"][name] = {
            "config": asdict(cfg),
            "train": _train_summary(runs),
            "olora_plus_overhead": ours["overhead"]["olora_plus_overhead"],
            "overhead": ours["overhead"],
            "init": init,
            "generation": ours["generation"],
            "eval_loss_tokens_per_second": ours["eval_pass"]["tokens_per_second"],
            "useful_flops_per_token": ours["flops_per_token"],
        }
        # useful FLOP/s of ours at its median speed, against the bf16 matmul peak of this run
        flops = ours["flops_per_token"] * results["models"][name]["train"]["ours_tokens_per_second"]
        results["models"][name].update(useful_gflops=flops / 1e9, roofline_fraction=flops / (peak["bf16_gflops"] * 1e9))
        print_table({name: results["models"][name]})
    if paper_size:
        results["paper_size"] = run_paper_size(data, paper_size)
        print_paper_size(results["paper_size"])
    results["wall_seconds"] = time.perf_counter() - start
    results["load_average"]["end"] = os.getloadavg()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    from oloraplus.files import write_json_atomic

    write_json_atomic(output, results)
    print(f"wrote {output} ({results['wall_seconds'] / 60:.1f} min)")
    return results


def _train_summary(runs: dict[str, list[dict]]) -> dict:
    """Per stack: median useful tokens/s and its values per data order, peak RSS, eval losses
    (first order, and per order with their spread); ours / reference and ours / configured."""
    train = {}
    for kind, rs in runs.items():
        speeds, losses = [r["tokens_per_second"] for r in rs], [r["eval_loss"] for r in rs]
        train.update({
            f"{kind}_tokens_per_second": statistics.median(speeds),
            f"{kind}_tokens_per_second_orders": speeds,
            f"{kind}_peak_rss_mb": rs[0]["peak_rss_mb"],
            f"{kind}_train_peak_rss_mb": rs[0]["train_peak_rss_mb"],
            f"{kind}_eval_loss": rs[0]["eval_loss"],
            f"{kind}_eval_loss_orders": losses,
            f"{kind}_eval_loss_spread": _spread(losses),
            f"{kind}_precision": rs[0]["precision"],
        })
    # The reference's speed depends on its data order (random batches pad differently), and every
    # stack's on how busy the machine is: a speed-up is the ratio of the medians.
    for other, key in (("reference", "speedup"), ("configured", "speedup_vs_configured")):
        train[key] = train["ours_tokens_per_second"] / train[f"{other}_tokens_per_second"]
        train[f"{key}_orders"] = [o / r for o, r in zip(train["ours_tokens_per_second_orders"],
                                                        train[f"{other}_tokens_per_second_orders"])]
        train[f"eval_loss_rel_diff{key[len('speedup'):]}"] = (
            abs(train["ours_eval_loss"] - train[f"{other}_eval_loss"]) / train[f"{other}_eval_loss"])
    return train


# TinyLlama-1.1B's published config (hidden 2048, 22 layers, 32 heads, 4 key/value heads, MLP 5632,
# vocab 32000), and the records and steps of the paper-size rows.
PAPER_SIZE = {"shape": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
                        "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000,
                        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
              "n_train": 32, "batch_size": 8}


def paper_size_checkpoint(folder: Path, data: str, shape: dict) -> Path:
    """Save a Llama of ``shape`` with random weights (bf16) and a byte-level BPE tokenizer of its
    vocabulary size, trained on the first 5,000 records of ``data``, as a checkpoint folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from oloraplus.data.records import load_records

    texts = [" ".join(str(v) for v in r.values()) for r in load_records(data).records[:5000]]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=shape["vocab_size"], special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def paper_size_config(data: str, settings: dict):
    """The bench config of the paper-size rows, over a random checkpoint of ``settings["shape"]``
    that lives as long as the context."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = paper_size_checkpoint(Path(tmp) / "paper-size", data, settings["shape"])
        yield BenchConfig(model=str(folder), data=data, n_train=settings["n_train"], n_eval=8,
                          batch_size=settings["batch_size"], orders=1)


def run_paper_size_stack(kind: str, cfg: BenchConfig, checkpointing: bool) -> dict:
    """One stack's few training steps on the paper-size model, in a child process (no evaluation)."""
    extra = {"measure_all": False} if kind == "ours" else {}
    return _run_child(kind, cfg, seed=cfg.seed, gradient_checkpointing=checkpointing, evaluate=False, **extra)


def run_paper_size(data: str, settings: dict) -> dict:
    """Each stack a few steps on the paper-size model, with and without gradient checkpointing:
    useful tokens/s and peak RSS during training (no evaluation: the weights are random)."""
    rows = {}
    print("[paper size] building the random TinyLlama-1.1B-shaped checkpoint ...", flush=True)
    with paper_size_config(data, settings) as cfg:
        for checkpointing in (False, True):
            for kind in STACKS:
                label = f"{kind}{' + gradient checkpointing' if checkpointing else ''}"
                print(f"[paper size] {label}: {cfg.n_train} records ...", flush=True)
                r = run_paper_size_stack(kind, cfg, checkpointing)
                rows[f"{kind}{'_checkpointing' if checkpointing else ''}"] = {
                    k: r[k] for k in ("tokens", "seconds", "tokens_per_second", "peak_rss_mb", "train_peak_rss_mb",
                                      "precision", "huge_page_allocations")}
    for suffix in ("", "_checkpointing"):
        ours, configured = rows[f"ours{suffix}"], rows[f"configured{suffix}"]
        rows[f"speedup_vs_configured{suffix}"] = ours["tokens_per_second"] / configured["tokens_per_second"]
        rows[f"speedup{suffix}"] = ours["tokens_per_second"] / rows[f"reference{suffix}"]["tokens_per_second"]
        if ours["train_peak_rss_mb"] and configured["train_peak_rss_mb"]:
            rows[f"train_peak_rss_vs_configured{suffix}"] = ours["train_peak_rss_mb"] / configured["train_peak_rss_mb"]
    return {"config": {**settings, "records": data}, "rows": rows}


def print_paper_size(result: dict) -> None:
    rows = result["rows"]
    print("\npaper size (TinyLlama-1.1B shape, random weights)")
    print(f"{'stack':40} {'tokens/s':>10} {'train peak MB':>14} {'process peak MB':>16}")
    for key, r in rows.items():
        if isinstance(r, dict):
            peak = f"{r['train_peak_rss_mb']:.0f}" if r["train_peak_rss_mb"] else "-"
            print(f"{key:40} {r['tokens_per_second']:>10.1f} {peak:>14} {r['peak_rss_mb']:>16.0f}")
    for key, value in rows.items():
        if not isinstance(value, dict):
            print(f"{key:40} {value:>10.2f}")
    print(flush=True)


def _spread(values: list[float]) -> float:
    """(max - min) / mean: the relative spread of a measurement over the data orders."""
    return (max(values) - min(values)) / statistics.mean(values)


def print_table(models: dict) -> None:
    for name, r in models.items():
        t, g = r["train"], r["generation"]
        rows = [
            ("train tokens/s (useful)", *_per_stack(t, "{:.0f}", "tokens_per_second"),
             f"{t['speedup']:.2f}x / {t['speedup_vs_configured']:.2f}x"),
            ("  per data order", *(_joined(t[f"{kind}_tokens_per_second_orders"])
                                   for kind in ("reference", "configured", "ours")),
             f"{_joined(t['speedup_orders'], '{:.2f}')} / {_joined(t['speedup_vs_configured_orders'], '{:.2f}')}"),
            ("train precision", *_per_stack(t, "{}", "precision"), ""),
            ("peak RSS MB (process)", *_per_stack(t, "{:.0f}", "peak_rss_mb"), ""),
            ("peak RSS MB (training)", *_per_stack(t, "{:.0f}", "train_peak_rss_mb"), ""),
            ("eval loss after training", *_per_stack(t, "{:.4f}", "eval_loss"),
             f"{100 * t['eval_loss_rel_diff']:.2f}% / {100 * t['eval_loss_rel_diff_vs_configured']:.2f}% apart"),
            ("OLoRA init s", f"{r['init']['peft_seconds']:.2f}", "", f"{r['init']['ours_seconds']:.2f}",
             f"{r['init']['speedup']:.2f}x"),
            ("generation new tokens/s", f"{g['loop_tokens_per_second']:.1f}", "", f"{g['ours_tokens_per_second']:.1f}",
             f"{g['speedup']:.2f}x, {100 * g['identical_share']:.0f}% identical"),
            ("eval-loss pass tokens/s", "", "", f"{r['eval_loss_tokens_per_second']:.0f}", ""),
            ("OLoRA+ (16) / OLoRA (1) step", "", "", f"{r['olora_plus_overhead']:.3f}", ""),
            ("roofline fraction (bf16)", "", "", f"{r['roofline_fraction']:.3f}", f"{r['useful_gflops']:.0f} GFLOP/s"),
        ]
        print(f"\n{name}")
        print(f"{'measure':30} {'Trainer defaults':>17} {'Trainer configured':>19} {'ours':>14}  "
              "ours / defaults / configured")
        for row in rows:
            print(f"{row[0]:30} {row[1]:>17} {row[2]:>19} {row[3]:>14}  {row[4]}")
        print(flush=True)


def _per_stack(train: dict, fmt: str, key: str) -> list[str]:
    """``train[<stack>_<key>]`` formatted for the three stacks, in the table's column order."""
    return [fmt.format(train[f"{kind}_{key}"]) if train.get(f"{kind}_{key}") is not None else "-"
            for kind in ("reference", "configured", "ours")]


def _joined(values: list[float], fmt: str = "{:.0f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


if __name__ == "__main__":
    payload = json.loads(sys.argv[1])
    cfg = BenchConfig(**payload["config"])
    kind = payload["kind"]
    result = CHILDREN[kind]() if kind == "peak" else CHILDREN[kind](cfg, **payload["kwargs"])
    Path(payload["out"]).write_text(json.dumps(result))
