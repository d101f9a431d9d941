"""Checkpoints and ``--resume``: a run killed after a checkpoint ends exactly where an
uninterrupted run ends; bad checkpoints, changed flags and a diverging loss are handled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_records
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from oloraplus.cli import main
from oloraplus.data.tokenize import tokenize_records
from oloraplus.errors import UserError
from oloraplus.method.adapters import apply_olora
from oloraplus.method.registry import METHODS
from oloraplus.method.trainer import KILL_AT_STEP_ENV
from oloraplus.training.checkpoints import CHECKPOINTS, RUN_CONFIG, resume_checkpoint
from oloraplus.training.config import TrainConfig
from oloraplus.training.recipe import build_trainer

RATIO = 4.0


def _flags(checkpoint: Path, data: Path, out: Path, method: str = "olora-plus") -> list[str]:
    return ["train", "--model", str(checkpoint), "--data", str(data), "--output", str(out),
            "--method", method, "--ratio", str(RATIO), "--rank", "4", "--lr", "5e-3",
            "--n-train", "16", "--n-eval", "6", "--batch-size", "2", "--max-steps", "6", "--save-steps", "2",
            "--max-new-tokens", "6", "--precision", "fp32", "--no-progress"]


def _group_lrs(checkpoint: Path) -> dict[str, float]:
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    return {g["name"]: g["lr"] for g in state["param_groups"]}


# PiSSA, registered like OLoRA, gets the same guarantee (its init also rewrites the base weights).
@pytest.mark.slow
@pytest.mark.parametrize("method", ["olora-plus", "pissa-plus"])
def test_sigkilled_run_resumes_to_the_same_weights_and_metrics(tiny_checkpoint, records_file, tmp_path, capsys,
                                                                method):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_flags(tiny_checkpoint, records_file, straight, method)) == 0, capsys.readouterr().err

    # Die like an OOM kill at the end of step 3: checkpoint-2 is on disk, step 3 is lost.
    env = {**os.environ, KILL_AT_STEP_ENV: "3", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "oloraplus", *_flags(tiny_checkpoint, records_file, killed, method)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert (killed / CHECKPOINTS / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (killed / CHECKPOINTS / "checkpoint-4").exists()
    assert not (killed / "results.json").exists(), "a killed run must not look complete"

    # Without --resume the folder is refused, with it the run continues.
    assert main(_flags(tiny_checkpoint, records_file, killed, method)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*_flags(tiny_checkpoint, records_file, killed, method), "--resume"]) == 0, capsys.readouterr().err

    a = json.loads((straight / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert a["method"]["init"] == METHODS[method].init
    adapter_config = json.loads((killed / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["init_lora_weights"] == METHODS[method].init  # plain PEFT rebuilds the start
    assert b["training"]["resumed_from"].endswith("checkpoint-2")
    assert a["training"]["steps"] == b["training"]["steps"] == 6
    assert b["metrics"]["eval_loss"] == pytest.approx(a["metrics"]["eval_loss"], abs=1e-6)
    for key in ("bleu", "rouge1", "rouge2", "rougeL"):
        assert b["metrics"][key] == a["metrics"][key], key
    assert (straight / "predictions.jsonl").read_text() == (killed / "predictions.jsonl").read_text()

    wa = load_file(straight / "adapter" / "adapter_model.safetensors")
    wb = load_file(killed / "adapter" / "adapter_model.safetensors")
    start = load_file(killed / CHECKPOINTS / "checkpoint-4" / "adapter_model.safetensors")
    assert set(wa) == set(wb)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6)
    assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 1e-4  # steps 5-6 did move the weights

    # The optimizer restored from checkpoint-2 kept its LoRA+ groups: lr_B / lr_A is the ratio.
    for run in (straight, killed):
        lrs = _group_lrs(run / CHECKPOINTS / "checkpoint-4")
        assert lrs["lora_B"] > 0 and lrs["lora_B"] / lrs["lora_A"] == pytest.approx(RATIO)
    assert _group_lrs(killed / CHECKPOINTS / "checkpoint-4") == _group_lrs(straight / CHECKPOINTS / "checkpoint-4")
    groups = b["training"]["optimizer_groups_per_rank"][0]
    assert groups["lora_B"]["lr"] == pytest.approx(RATIO * groups["lora_A"]["lr"])


class _Recorder(TrainerCallback):
    """Stops training after ``stop_at`` steps (a crash, minus the process death)."""

    def __init__(self, stop_at: int | None):
        self.stop_at = stop_at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.stop_at:
            control.should_training_stop = True


@pytest.mark.parametrize("group_by_length", [True, False], ids=["group-by-length", "random"])
def test_data_order_after_resume_is_the_uninterrupted_order(group_by_length, tiny_checkpoint, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    examples, _ = tokenize_records(make_records(24), tokenizer, max_length=64)

    def run(out: Path, stop_at=None, resume=None) -> list:
        config = TrainConfig(output=str(out), method="olora", rank=4, batch_size=2, max_steps=8, save_steps=2,
                             group_by_length=group_by_length, progress=False, seed=3)
        model = apply_olora(AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32),
                            config.adapter_config())
        trainer = build_trainer(config, model, tokenizer, examples, out, "fp32", "cpu")
        trainer.add_callback(_Recorder(stop_at))
        seen = []
        compute_loss = trainer.compute_loss

        def recording(model, inputs, *args, **kwargs):
            seen.append(sorted(tuple(row) for row in inputs["input_ids"].tolist()))
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = recording
        trainer.train(resume_from_checkpoint=resume)
        return seen

    full = run(tmp_path / "a")
    first = run(tmp_path / "b", stop_at=5)
    rest = run(tmp_path / "b", resume=str(tmp_path / "b" / CHECKPOINTS / "checkpoint-4"))
    assert len(full) == 8 and len(first) == 5 and len(rest) == 4
    assert first[:4] + rest == full
    assert len({tuple(batch) for batch in full}) == 8  # distinct batches: the comparison is not trivial


def _state(folder: Path, step: int, text: str | None = None) -> None:
    """A checkpoint folder with stand-in weights and optimizer state, and ``text`` as its trainer_state.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({}, folder / name)
    if text is not None:
        (folder / "trainer_state.json").write_text(text)


def test_resume_skips_a_checkpoint_cut_off_while_saving(tmp_path):
    out = tmp_path / "run"
    _state(out / CHECKPOINTS / "checkpoint-2", 2, json.dumps({"global_step": 2}))
    _state(out / CHECKPOINTS / "checkpoint-4", 4, None)  # killed before trainer_state.json
    _state(out / CHECKPOINTS / "checkpoint-6", 6, '{"global_step": 6, "log_hist')  # killed while writing it
    found = resume_checkpoint(TrainConfig(output=str(out), method="olora", resume=True))
    assert found == str(out / CHECKPOINTS / "checkpoint-2")


def test_resume_refuses_other_training_flags_but_not_speed_flags(tmp_path):
    out = tmp_path / "run"
    _state(out / CHECKPOINTS / "checkpoint-2", 2, json.dumps({"global_step": 2}))
    stored = TrainConfig(output=str(out), method="olora", lr=1e-3, save_steps=2)
    (out / CHECKPOINTS / RUN_CONFIG).write_text(json.dumps(stored.__dict__))
    same = TrainConfig(output=str(out), method="olora", lr=1e-3, save_steps=2, resume=True, eval_batch_size=3,
                       progress=False)
    assert resume_checkpoint(same).endswith("checkpoint-2")
    with pytest.raises(UserError, match=r"lr: 0\.001 there, 0\.002 now"):
        resume_checkpoint(TrainConfig(output=str(out), method="olora", lr=2e-3, save_steps=2, resume=True))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_checkpoint, records_file,
                                                                            tmp_path, capsys):
    out = tmp_path / "run"
    flags = _flags(tiny_checkpoint, records_file, out)
    flags[flags.index("--lr") + 1] = "1e30"  # one Adam step of size 1e30 makes the next loss inf/NaN
    flags[flags.index("--save-steps") + 1] = "1"
    assert main(flags) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: training loss is "), err
    assert "at step 2" in err[0] and "checkpoint-1" in err[0]
    assert (out / CHECKPOINTS / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (out / CHECKPOINTS / "checkpoint-2").exists()
    assert not (out / "results.json").exists()
    weights = load_file(out / CHECKPOINTS / "checkpoint-1" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
