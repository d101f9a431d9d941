"""``torchrun --nproc_per_node 2 -m oloraplus train``: data-parallel on CPU (gloo).

--batch-size is the global batch, so the 2-process run takes the same optimiser steps on the
same examples as a 1-process run; only rank 0 evaluates and writes the run folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from conftest import make_records
from transformers import AutoModelForCausalLM, AutoTokenizer

from oloraplus.cli import main
from oloraplus.data.tokenize import tokenize_records
from oloraplus.evaluation.evaluate import eval_loss

dist = pytest.importorskip("torch.distributed")
pytestmark = [pytest.mark.slow,  # real torchrun / gloo processes
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with gloo is not available")]
RATIO = 4.0


def _kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment carries ``tag``: the launcher and its workers.

    torchrun starts each worker in a process group of its own, so killing the launcher's group
    does not reach a worker that hangs; a leftover worker also holds the test's pipes open.
    """
    marker = f"OLORAPLUS_TEST_TAG={tag}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            continue


def _flags(checkpoint, data, out) -> list[str]:
    return ["train", "--model", str(checkpoint), "--data", str(data), "--output", str(out),
            "--method", "olora-plus", "--ratio", str(RATIO), "--rank", "4", "--lr", "1e-2",
            "--n-train", "16", "--n-eval", "8", "--batch-size", "4", "--max-steps", "4",
            "--max-new-tokens", "4", "--precision", "fp32", "--no-progress"]


def test_two_process_run_matches_one_process_run(tiny_checkpoint, records_file, tmp_path, capsys, monkeypatch):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # Both runs on CPU, also where a GPU is visible: this is the gloo path.
    tag = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "OLORAPLUS_TEST_TAG": tag}
    monkeypatch.setattr("oloraplus.training.recipe.default_device", lambda: "cpu")
    env.pop("WORLD_SIZE", None)
    # --standalone: a local rendezvous on a free port.
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "oloraplus", *_flags(tiny_checkpoint, records_file, ddp)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        stdout, stderr = launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_tagged(tag)
        launcher.communicate()
        raise
    finally:
        _kill_tagged(tag)  # no worker outlives the test, whatever happened
    assert launcher.returncode == 0, stderr[-3000:]
    assert stdout.count("wrote ") == 1, "only rank 0 reports and writes"

    assert main(_flags(tiny_checkpoint, records_file, single)) == 0, capsys.readouterr().err

    a = json.loads((single / "results.json").read_text())
    b = json.loads((ddp / "results.json").read_text())
    assert (a["training"]["processes"], b["training"]["processes"]) == (1, 2)
    assert (a["training"]["per_device_batch_size"], b["training"]["per_device_batch_size"]) == (4, 2)
    assert a["training"]["steps"] == b["training"]["steps"] == 4  # 16 examples / global batch 4
    assert b["data"]["eval_indices"] == a["data"]["eval_indices"]
    assert len((ddp / "predictions.jsonl").read_text().splitlines()) == 8
    assert (ddp / "adapter" / "adapter_model.safetensors").is_file()

    # Every rank built the same LoRA+ groups: lr_B = ratio * lr_A over the same parameters.
    per_rank = b["training"]["optimizer_groups_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1] == a["training"]["optimizer_groups_per_rank"][0]
    assert per_rank[1]["lora_B"]["lr"] == pytest.approx(RATIO * per_rank[1]["lora_A"]["lr"])

    # Same eval loss within 2%, and training moved it by much more than that.
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    records = make_records(40)
    examples, _ = tokenize_records([records[i] for i in a["data"]["eval_indices"]], tokenizer, max_length=512)
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    untrained = eval_loss(base, examples, tokenizer.pad_token_id, progress=False)["eval_loss"]
    single_loss, ddp_loss = a["metrics"]["eval_loss"], b["metrics"]["eval_loss"]
    assert untrained - single_loss > 0.05 * untrained
    assert abs(ddp_loss - single_loss) < 0.02 * single_loss


def _finish_worker(rank: int, init_file: str, rank0_fails: bool, queue) -> None:
    import time

    import torch.distributed as tdist

    from oloraplus.training.distributed import ranks_finish_together, shutdown

    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    outcome, moment = "left", 0.0
    try:
        with ranks_finish_together():
            if rank == 0:
                time.sleep(1.0)  # rank 0 evaluates; rank 1 waits in the block meanwhile
                moment = time.time()  # rank 0's work ends
                if rank0_fails:
                    raise RuntimeError("evaluation failed")
        moment = moment or time.time()  # rank 1 is out of the block
    except RuntimeError as exc:
        outcome = f"raised: {exc}"
    finally:
        shutdown()
    queue.put((rank, outcome, moment))


@pytest.mark.parametrize("rank0_fails", [False, True])
def test_ranks_leave_together_also_when_rank_0_fails(tmp_path, rank0_fails):
    """The other ranks wait for rank 0's evaluation, and rank 0's error does not strand them."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_finish_worker, args=(r, str(tmp_path / "init"), rank0_fails, queue))
               for r in (0, 1)]
    for w in workers:
        w.start()
    try:
        results = {rank: (outcome, t) for rank, outcome, t in (queue.get(timeout=90) for _ in workers)}
        for w in workers:
            w.join(timeout=30)
        assert [w.exitcode for w in workers] == [0, 0]
    finally:
        for w in workers:
            w.kill()
    assert results[0][0] == ("raised: evaluation failed" if rank0_fails else "left")
    assert results[1][0] == "left"
    assert results[1][1] >= results[0][1]  # rank 1 left only after rank 0's work was done


def test_more_processes_than_gpus_is_a_one_line_error(monkeypatch):
    from oloraplus.errors import UserError
    from oloraplus.training.distributed import local_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device("cuda", gpus=2) == "cuda:1"
    assert local_device("cpu", gpus=0) == "cpu"
    with pytest.raises(UserError, match="only 1 GPU"):
        local_device("cuda", gpus=1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert local_device("cuda", gpus=1) == "cuda"  # not distributed: no rank suffix


def test_trainer_refuses_parameters_without_lora_names(tiny_tokenizer, tmp_path):
    """What FSDP with use_orig_params=False looks like to the optimizer: no 'lora_B' in any name."""
    from conftest import tiny_model
    from transformers import TrainingArguments

    from oloraplus.errors import UserError
    from oloraplus.method.trainer import OLoRAPlusTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")
    model = tiny_model("llama")  # trainable, but no LoRA parameter names
    with pytest.raises(UserError, match="use_orig_params=true"):
        OLoRAPlusTrainer(model=model, args=args, ratio=4.0).create_optimizer()
    assert OLoRAPlusTrainer(model=model, args=args, ratio=1.0).create_optimizer() is not None
