"""``fast.memory.keep_freed_memory``: freed blocks are reused, not faulted in again page by page.

Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from oloraplus.fast.memory import keep_freed_memory

# Allocates, touches and frees a 64 MiB tensor 12 times (the heap settles: a freed block is a
# little too small for the next 64-byte-aligned one until neighbours coalesce, which took from 2
# to 8 rounds), then counts the minor page faults of 4 more.
SCRIPT = """
import resource, sys, torch
from oloraplus.fast.memory import keep_freed_memory
kept = keep_freed_memory(sys.argv[1]) if sys.argv[1] != "default" else False
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    torch.ones(64 * 2**20, dtype=torch.uint8)
before = faults()
for _ in range(4):
    torch.ones(64 * 2**20, dtype=torch.uint8)
print(kept, faults() - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    default_kept, default_faults = _faults("default")
    kept, kept_faults = _faults("cpu")
    assert (default_kept, kept) == ("False", "True")
    # glibc's default unmaps a freed 64 MiB block, so touching a new one faults it in again
    # (16384 pages of 4 KiB, or 32 huge pages of 2 MiB, each time); kept, the memory is reused.
    assert default_faults >= 4 * 32
    assert kept_faults < 16


def test_other_devices_are_left_alone():
    assert keep_freed_memory("cuda") is False
    assert keep_freed_memory("cuda:1") is False


def test_train_and_evaluate_keep_freed_memory_before_loading_the_model(tmp_path, tiny_checkpoint, records_file,
                                                                        monkeypatch):
    from oloraplus.cli import main
    from oloraplus.training import recipe as train_module

    calls: list[str] = []
    load_model = train_module.load_model
    monkeypatch.setattr(train_module, "default_device", lambda: "cpu")  # also where a GPU is visible
    monkeypatch.setattr(train_module, "keep_freed_memory", lambda device: calls.append(device))
    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: (calls.append("load"), load_model(*a, **k))[1])
    common = ["--model", str(tiny_checkpoint), "--data", str(records_file), "--n-train", "8", "--n-eval", "2",
              "--max-new-tokens", "2", "--precision", "fp32", "--no-progress"]
    run = tmp_path / "run"
    assert main(["train", *common, "--method", "olora", "--rank", "4", "--batch-size", "4", "--max-steps", "1",
                 "--output", str(run)]) == 0
    assert main(["evaluate", *common, "--adapter", str(run / "adapter"), "--output", str(tmp_path / "eval")]) == 0
    assert calls == ["cpu", "load", "cpu", "load"]


@pytest.mark.slow
def test_compiled_layers_compute_what_the_eager_layers_compute():
    """Regional compilation: each decoder layer compiled, same loss and LoRA gradients, undone for eval."""
    import torch
    from conftest import tiny_model

    from oloraplus.fast.compile import compile_layers, decoder_layers, uncompile_layers
    from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora
    from oloraplus.training.runtime import merged_for_eval

    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4))
    ids = torch.randint(0, 320, (2, 12))

    def loss_and_grads():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    eager_loss, eager_grads = loss_and_grads()
    assert compile_layers(model, "cpu") == 2 == len(decoder_layers(model))
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    compiled_loss, compiled_grads = loss_and_grads()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) == 2 * 7 * 2
    for name, grad in eager_grads.items():
        # fused kernels sum in another order: the tolerance is scaled to each gradient's size
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(), msg=name)
    merged = merged_for_eval(model)
    assert all(m._compiled_call_impl is None for m in merged.modules())
    uncompile_layers(merged)  # idempotent


def test_compile_refuses_a_model_without_decoder_layers():
    import torch

    from oloraplus.errors import UserError
    from oloraplus.fast.compile import compile_layers

    with pytest.raises(UserError, match="no decoder layers"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), "cpu")


def test_compile_needs_a_cpp_compiler_on_cpu(monkeypatch):
    from conftest import tiny_model

    from oloraplus.errors import UserError
    from oloraplus.fast.compile import compile_layers

    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        compile_layers(tiny_model("llama"), "cpu")


@pytest.mark.slow
def test_a_grid_with_compile_trains_each_run_compiled_and_like_without_it(tmp_path, tiny_checkpoint, records_file,
                                                                           monkeypatch):
    """`--compile` through `sweep`: two runs in one process, each compiled, each learning what it learns eagerly."""
    import json

    from oloraplus.cli import main
    from oloraplus.training import recipe as train_module

    monkeypatch.setattr(train_module, "default_device", lambda: "cpu")
    compiled_counts: list[int] = []
    compile_layers = train_module.compile_layers
    monkeypatch.setattr(train_module, "compile_layers", lambda *a: compiled_counts.append(compile_layers(*a)))
    common = ["sweep", "--models", str(tiny_checkpoint), "--ratios", "1", "4", "--seeds", "1", "--data",
              str(records_file), "--n-train", "8", "--n-eval", "4", "--batch-size", "4", "--rank", "4",
              "--max-new-tokens", "4", "--metrics-mode", "teacher-forced", "--precision", "fp32", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "eager")]) == 0
    assert main([*common, "--compile", "--output", str(tmp_path / "compiled")]) == 0
    assert compiled_counts == [2, 2]  # both runs, each with its 2 decoder layers
    eager, compiled = ([json.loads(line) for line in (tmp_path / grid / "runs.jsonl").read_text().splitlines()]
                       for grid in ("eager", "compiled"))
    assert [r["ratio"] for r in compiled] == [r["ratio"] for r in eager] == [1.0, 4.0]
    for e, c in zip(eager, compiled):
        results_e, results_c = (json.loads((tmp_path / grid / r["run_dir"] / "results.json").read_text())
                                for grid, r in (("eager", e), ("compiled", c)))
        assert (results_e["config"]["compile"], results_c["config"]["compile"]) == (False, True)
        assert results_c["training"]["steps"] == results_e["training"]["steps"] == 2
        for loss in (lambda r: r["metrics"]["eval_loss"], lambda r: r["training"]["train_loss"]):
            assert abs(loss(results_c) - loss(results_e)) < 1e-4 * loss(results_e)
