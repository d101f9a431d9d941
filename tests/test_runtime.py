"""``runtime.keep_freed_memory``: freed blocks are reused, not faulted in again page by page.

Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from oloraplus.runtime import keep_freed_memory

# Allocates, touches and frees a 64 MiB tensor 6 times (the heap settles: a freed block is a
# little too small for the next 64-byte-aligned one until neighbours coalesce), then counts the
# minor page faults of 4 more.
SCRIPT = """
import resource, sys, torch
from oloraplus.runtime import keep_freed_memory
kept = keep_freed_memory(sys.argv[1]) if sys.argv[1] != "default" else False
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
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
    from oloraplus import train as train_module
    from oloraplus.cli import main

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
