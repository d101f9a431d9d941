"""Fault injection: weights, adapters, checkpoints and data are checked against what they claim.

Each test damages one thing the way a crash, a disk, a copy or a hand edit would (truncate,
rename, corrupt, edit, collide) and checks the run either refuses with one ``error:`` line
(exit 2) or falls back with a ``warning:`` line, never a traceback and never a result that
looks right but is not.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_records, tiny_model
from safetensors.torch import load_file, save_file

import oloraplus.experiments.grid as grid
import oloraplus.training.recipe as recipe
from oloraplus.cli import main
from oloraplus.errors import UserError
from oloraplus.experiments.report import read_runs
from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora
from oloraplus.method.identity import IDENTITY_FILE, model_fingerprint
from oloraplus.models.loading import load_model
from oloraplus.training.checkpoints import CHECKPOINTS, RUN_CONFIG, resume_checkpoint
from oloraplus.training.config import TrainConfig


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _save_llama(path: Path, tokenizer, seed: int = 0, **config) -> Path:
    model = tiny_model("llama", seed=seed)
    for key, value in config.items():
        setattr(model.config, key, value)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _train_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--method", "olora",
            "--rank", "4", "--lr", "5e-3", "--n-train", "16", "--n-eval", "4", "--batch-size", "4",
            "--max-new-tokens", "4", "--precision", "fp32", "--no-progress", *extra]


# --- class 2: weights that do not match their config -------------------------------------------


def test_checkpoint_with_renamed_weights_is_refused(tiny_checkpoint):
    weights = tiny_checkpoint / "model.safetensors"
    tensors = load_file(weights)
    renamed = {(k.replace("layers.1.", "blocks.1.")): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"does not match its config.json: \d+ missing weight\(s\) \(model.layers.1"):
        load_model(str(tiny_checkpoint))


def test_truncated_model_file_is_one_error_line(tiny_checkpoint, records_file, tmp_path, capsys):
    weights = tiny_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(_train_argv(tiny_checkpoint, records_file, tmp_path / "run", "--max-steps", "1")) == 2
    line = _error_line(capsys)
    assert "cannot load model" in line and "incomplete metadata" in line, line
    assert not (tmp_path / "run" / "results.json").exists()


def test_lm_head_tied_to_the_embeddings_is_refused_and_untied_keeps_step0_output(tiny_tokenizer, records_file,
                                                                                  tmp_path, capsys):
    tied = tiny_model("gemma")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(UserError, match="'.*lm_head' shares its weight with '.*embed_tokens' \\(tied embeddings\\)"):
        apply_olora(tied, OLoRAPlusConfig(rank=4, target_modules=["lm_head", "q_proj"]))

    capsys.readouterr()
    gemma = tmp_path / "gemma"
    tied.save_pretrained(gemma)
    tiny_tokenizer.save_pretrained(gemma)
    argv = _train_argv(gemma, records_file, tmp_path / "run", "--max-steps", "1", "--target-modules", "lm_head")
    assert main(argv) == 2
    assert "'lm_head' shares its weight with 'model.embed_tokens'" in _error_line(capsys)

    untied = tiny_model("llama")  # tie_word_embeddings=False: adapting lm_head is fine
    ids = torch.randint(4, 300, (2, 9))
    with torch.no_grad():
        before = untied(input_ids=ids).logits
        adapted = apply_olora(untied, OLoRAPlusConfig(rank=4, target_modules=["lm_head", "q_proj"]))
        after = adapted(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_fingerprint_is_deterministic_and_sees_a_changed_weight(tiny_checkpoint):
    a, _ = load_model(str(tiny_checkpoint))
    b, _ = load_model(str(tiny_checkpoint))
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    assert model_fingerprint(a) != model_fingerprint(b)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer):
    """One finished tiny run (its adapter), its base model, and another base of the same shape."""
    root = tmp_path_factory.mktemp("trained")
    base = _save_llama(root / "base", tiny_tokenizer, seed=0)
    other = _save_llama(root / "other", tiny_tokenizer, seed=1)
    data = root / "data.json"
    data.write_text(json.dumps(make_records(40)))
    assert main(_train_argv(base, data, root / "run", "--max-steps", "2")) == 0
    return {"base": base, "other": other, "data": data, "adapter": root / "run" / "adapter"}


def _adapter_copy(trained, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained["adapter"], tmp_path / "adapter"))


def _evaluate_argv(trained, model: Path, adapter: Path, out: Path) -> list[str]:
    return ["evaluate", "--model", str(model), "--adapter", str(adapter), "--data", str(trained["data"]),
            "--output", str(out), "--n-train", "16", "--n-eval", "4", "--max-new-tokens", "4",
            "--precision", "fp32", "--no-progress"]


def test_adapter_records_its_base_and_is_refused_on_another(trained, tmp_path, capsys):
    identity = json.loads((trained["adapter"] / IDENTITY_FILE).read_text())
    assert len(identity["base_fingerprint"]) == 64 and identity["adapter_config"]["init_lora_weights"] == "olora"

    assert main(_evaluate_argv(trained, trained["other"], trained["adapter"], tmp_path / "ev")) == 2
    assert "was trained on a different base model" in _error_line(capsys)
    assert not (tmp_path / "ev" / "results.json").exists()
    for to in ("lora", "merged"):
        argv = ["export", "--model", str(trained["other"]), "--adapter", str(trained["adapter"]), "--to", to,
                "--output", str(tmp_path / f"x-{to}")]
        assert main(argv) == 2
        assert "different base model" in _error_line(capsys)
        assert not (tmp_path / f"x-{to}").exists()
    # On its own base it exports.
    assert main(["export", "--model", str(trained["base"]), "--adapter", str(trained["adapter"]), "--to", "lora",
                 "--output", str(tmp_path / "ok")]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("init_lora_weights", True), ("target_modules", ["q_proj"]),
                                          ("r", 8), ("lora_alpha", 3)])
def test_edited_adapter_config_is_refused(trained, tmp_path, capsys, field, value):
    adapter = _adapter_copy(trained, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[field] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    argv = ["export", "--model", str(trained["base"]), "--adapter", str(adapter), "--to", "lora",
            "--output", str(tmp_path / "x")]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "adapter_config.json was edited after training" in line and field in line, line


def test_adapter_of_another_tool_is_accepted_with_a_warning(trained, tmp_path, capsys):
    adapter = _adapter_copy(trained, tmp_path)
    (adapter / IDENTITY_FILE).unlink()
    assert main(_evaluate_argv(trained, trained["base"], adapter, tmp_path / "ev")) == 0
    err = capsys.readouterr().err
    assert f"warning: {adapter} has no {IDENTITY_FILE}" in err and "error:" not in err
    assert (tmp_path / "ev" / "results.json").is_file()


def test_damaged_identity_file_is_one_error_line(trained, tmp_path, capsys):
    adapter = _adapter_copy(trained, tmp_path)
    (adapter / IDENTITY_FILE).write_text('{"base_fingerprint": ')
    argv = ["export", "--model", str(trained["base"]), "--adapter", str(adapter), "--to", "lora",
            "--output", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "is damaged" in _error_line(capsys)


# --- class 3: resume ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tiny_tokenizer):
    """A finished 6-step run with checkpoints 4 and 6 kept (save_total_limit=2)."""
    root = tmp_path_factory.mktemp("checkpointed")
    base = _save_llama(root / "base", tiny_tokenizer)
    data = root / "data.json"
    data.write_text(json.dumps(make_records(40)))
    argv = _train_argv(base, data, root / "run", "--max-steps", "6", "--save-steps", "2", "--batch-size", "2")
    assert main(argv) == 0
    return {"base": base, "data": data, "run": root / "run", "argv": argv}


def _interrupted(checkpointed, tmp_path: Path) -> Path:
    """A copy of the run as if it had been killed after its last checkpoint."""
    run = Path(shutil.copytree(checkpointed["run"], tmp_path / "run"))
    for name in ("results.json", "predictions.jsonl"):
        (run / name).unlink()
    shutil.rmtree(run / "adapter")
    return run


def _config(checkpointed, run: Path, **changes) -> TrainConfig:
    config = TrainConfig(output=str(run), model=str(checkpointed["base"]), data=str(checkpointed["data"]),
                         method="olora", rank=4, lr=5e-3, n_train=16, n_eval=4, batch_size=2, max_new_tokens=4,
                         precision="fp32", progress=False, max_steps=6, save_steps=2, resume=True)
    return replace(config, **changes)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated adapter", "no trainer_state", "truncated optimizer",
                                    "corrupt trainer_state"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(checkpointed, tmp_path, capsys, damage):
    run = _interrupted(checkpointed, tmp_path)
    latest = run / CHECKPOINTS / "checkpoint-6"
    if damage == "truncated adapter":
        _truncate(latest / "adapter_model.safetensors")
    elif damage == "no trainer_state":
        (latest / "trainer_state.json").unlink()
    elif damage == "truncated optimizer":
        _truncate(latest / "optimizer.pt")
    else:
        (latest / "trainer_state.json").write_text('{"global_step": 6, ')
    assert resume_checkpoint(_config(checkpointed, run)) == str(run / CHECKPOINTS / "checkpoint-4")
    err = capsys.readouterr().err
    assert "warning: --resume: skipping checkpoint-6" in err and "resuming from checkpoint-4" in err, err


def test_resume_from_the_fallback_checkpoint_ends_where_the_straight_run_ended(checkpointed, tmp_path, capsys):
    run = _interrupted(checkpointed, tmp_path)
    _truncate(run / CHECKPOINTS / "checkpoint-6" / "adapter_model.safetensors")
    assert main([*checkpointed["argv"][:6], str(run), *checkpointed["argv"][7:], "--resume"]) == 0
    assert "resuming from checkpoint-4" in capsys.readouterr().err
    a = json.loads((checkpointed["run"] / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    assert b["training"]["resumed_from"].endswith("checkpoint-4") and b["training"]["steps"] == 6
    assert b["metrics"]["eval_loss"] == pytest.approx(a["metrics"]["eval_loss"], abs=1e-6)
    wa = load_file(checkpointed["run"] / "adapter" / "adapter_model.safetensors")
    wb = load_file(run / "adapter" / "adapter_model.safetensors")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6)


def test_resume_without_optimizer_state_needs_the_weights_only_flag(checkpointed, tmp_path, capsys):
    run = _interrupted(checkpointed, tmp_path)
    for step in (4, 6):
        (run / CHECKPOINTS / f"checkpoint-{step}" / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="has no optimizer state.*--resume-weights-only"):
        resume_checkpoint(_config(checkpointed, run))
    capsys.readouterr()
    chosen = resume_checkpoint(_config(checkpointed, run, resume_weights_only=True))
    assert chosen == str(run / CHECKPOINTS / "checkpoint-6")
    assert "not an exact resume" in capsys.readouterr().err


def test_resume_with_a_changed_data_file_is_refused(checkpointed, tmp_path):
    run = _interrupted(checkpointed, tmp_path)
    stored = json.loads((run / CHECKPOINTS / RUN_CONFIG).read_text())
    assert stored["data_sha256"] and stored["resume_weights_only"] is False
    data = checkpointed["data"]
    original = data.read_bytes()
    try:
        data.write_text(json.dumps(make_records(40, seed=1)))  # edited in place while the run was down
        with pytest.raises(UserError, match="the data file .* changed since the interrupted run started"):
            resume_checkpoint(_config(checkpointed, run))
    finally:
        data.write_bytes(original)
    assert resume_checkpoint(_config(checkpointed, run)).endswith("checkpoint-6")


def test_no_complete_checkpoint_lists_why(checkpointed, tmp_path):
    run = _interrupted(checkpointed, tmp_path)
    for step in (4, 6):
        _truncate(run / CHECKPOINTS / f"checkpoint-{step}" / "adapter_model.safetensors")
    with pytest.raises(UserError, match="no complete checkpoint .*checkpoint-6 has damaged adapter weights"):
        resume_checkpoint(_config(checkpointed, run))


# --- class 5/6: data -----------------------------------------------------------------------------


def _fail_if_model_loaded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before a data error")

    monkeypatch.setattr(recipe, "load_model", refuse)


@pytest.mark.parametrize("name, content, needle", [
    ("nested.json", "[" * 100000 + "]" * 100000, "nested too deeply"),
    ("nested.jsonl", json.dumps(make_records(1)[0]) + "\n" + "[" * 100000 + "]" * 100000 + "\n",
     "line 2: JSON nested too deeply"),
    ("surrogate.json", json.dumps(make_records(30)[:7] + [{"instruction": "a\ud800b", "input": "", "output": "x"}]),
     "record 7 field 'instruction' holds an unpaired surrogate"),
])
def test_malformed_data_is_one_error_line_before_loading(tmp_path, monkeypatch, capsys, name, content, needle):
    _fail_if_model_loaded(monkeypatch)
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    assert main(_train_argv(tmp_path / "no-model", data, tmp_path / "run")) == 2
    assert needle in _error_line(capsys)


def test_every_record_too_long_fails_before_the_adapters(tiny_checkpoint, records_file, tmp_path, monkeypatch,
                                                         capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("adapters built although no record fits")

    monkeypatch.setattr(recipe, "apply_olora", refuse)
    assert main(_train_argv(tiny_checkpoint, records_file, tmp_path / "run", "--max-length", "8")) == 2
    line = _error_line(capsys)
    assert f"every training record of {records_file} is longer than --max-length 8" in line


def test_dropped_and_overlapping_records_are_warned_and_counted(tiny_checkpoint, tmp_path, capsys):
    records = make_records(20) * 2  # every record twice: the eval set lies inside the training set
    records[0] = {**records[0], "instruction": "Write " + "river " * 80}  # a prompt longer than --max-length
    records[20] = records[0]
    data = tmp_path / "dup.json"
    data.write_text(json.dumps(records))
    argv = _train_argv(tiny_checkpoint, data, tmp_path / "run", "--max-steps", "1", "--n-train", "30",
                       "--n-eval", "8", "--max-length", "64")
    assert main(argv) == 0
    err = capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    overlap = results["data"]["eval_in_train"]
    assert overlap > 0 and f"warning: {overlap} of the 8 eval records" in err, err
    dropped = results["data"]["train_tokens"]["dropped"] + results["data"]["eval_tokens"]["dropped"]
    assert dropped >= 1 and "dropped: the prompt fills --max-length 64" in err


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range_is_refused_at_once(tmp_path, monkeypatch, capsys, seed, records_file):
    _fail_if_model_loaded(monkeypatch)
    assert main(_train_argv(tmp_path / "no-model", records_file, tmp_path / "run", f"--seed={seed}")) == 2
    assert "--seed must be an integer from 0 to 4294967295" in _error_line(capsys)


# --- grids and runs.jsonl ------------------------------------------------------------------------


@pytest.mark.parametrize("line, needle", [("[1, 2]", "line 2 is a JSON list, not a run"),
                                          ('{"key": "m/olora-r1-s0", "model": "m"}', "line 2 has no 'method'"),
                                          ('{"key": 1, "model": "m", "method": "olora", "ratio": 1, "seed": 0, '
                                           '"metrics": {}}', "line 2 is not a run: its 'key' is a int"),
                                          ("[" * 100000, "line 2 is nested too deeply")])
def test_runs_file_row_that_is_not_a_run(tmp_path, capsys, line, needle):
    good = {"key": "m/olora-r1-s0", "model": "m", "method": "olora", "ratio": 1.0, "seed": 0,
            "metrics": {"eval_loss": 1.0}}
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(UserError, match=needle):
        read_runs(path)
    assert main(["report", str(tmp_path)]) == 2
    assert needle in _error_line(capsys)


def _fake_train(calls: list):
    from dataclasses import asdict

    from oloraplus.data.records import data_sha256

    def fake(config):
        calls.append(config.output)
        out = Path(config.output)
        out.mkdir(parents=True, exist_ok=True)
        results = {"metrics": {"eval_loss": 1.0, "perplexity": 1, "bleu": 1, "rouge1": 1, "rouge2": 1, "rougeL": 1},
                   "config": asdict(config), "data": {"sha256": data_sha256(config.data)}}
        (out / "results.json").write_text(json.dumps(results))
        return results

    return fake


def test_grid_rerun_and_reuse_compare_the_data_file(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(grid, "train", _fake_train(calls))
    data = tmp_path / "data.json"
    data.write_text(json.dumps(make_records(40)))
    specs = grid.expand_grid([str(tmp_path)], ratios=[16.0], seeds=1, n_train=10, data=str(data))
    monkeypatch.setattr(grid, "resolve_model", lambda name: name)
    grid.run_grid(specs, tmp_path / "a", log=lambda _: None)
    assert len(calls) == 2
    grid.run_grid(specs, tmp_path / "a", log=lambda _: None)  # same data: nothing to do
    assert len(calls) == 2

    data.write_text(json.dumps(make_records(40, seed=1)))  # the file changes under the grid
    with pytest.raises(UserError, match="already finished on another version of .*data.json"):
        grid.run_grid(specs, tmp_path / "a", log=lambda _: None)
    assert len(calls) == 2
    grid.run_grid(specs, tmp_path / "b", log=lambda _: None, reuse=[tmp_path / "a"])
    assert len(calls) == 4  # trained again, not copied from runs on the old data


def test_grid_checks_every_model_name_before_the_first_run(tiny_checkpoint, tmp_path, monkeypatch, records_file,
                                                           capsys):
    calls: list = []
    monkeypatch.setattr(grid, "train", _fake_train(calls))
    argv = ["sweep", "--models", str(tiny_checkpoint), "no-such-model", "--ratios", "4", "--seeds", "1",
            "--data", str(records_file), "--output", str(tmp_path / "g")]
    code = main(argv)
    line = _error_line(capsys)
    assert code == 2 and "unknown model 'no-such-model'" in line and calls == []


def test_weights_only_resume_continues_without_optimizer_state(checkpointed, tmp_path, capsys):
    run = _interrupted(checkpointed, tmp_path)
    for step in (4, 6):
        (run / CHECKPOINTS / f"checkpoint-{step}" / "optimizer.pt").unlink()
    argv = [*checkpointed["argv"][:6], str(run), *checkpointed["argv"][7:], "--resume"]
    assert main(argv) == 2
    assert "--resume-weights-only" in _error_line(capsys)
    assert main([*argv, "--resume-weights-only"]) == 0
    assert "not an exact resume" in capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    assert results["training"]["resumed_from"].endswith("checkpoint-6")
    assert results["config"]["resume_weights_only"] is True


@pytest.mark.slow
def test_killed_run_with_a_damaged_checkpoint_resumes_from_the_one_before(checkpointed, tmp_path, capsys):
    """SIGKILL after checkpoint-4 (as an OOM kill), then the disk loses the end of checkpoint-4's
    optimizer.pt: --resume continues from checkpoint-2 and still ends where the straight run ended."""
    import os
    import subprocess
    import sys

    from oloraplus.method.trainer import KILL_AT_STEP_ENV

    run = tmp_path / "run"
    argv = [*checkpointed["argv"][:6], str(run), *checkpointed["argv"][7:]]
    env = {**os.environ, KILL_AT_STEP_ENV: "5", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "oloraplus", *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not (run / "results.json").exists()
    _truncate(run / CHECKPOINTS / "checkpoint-4" / "optimizer.pt")
    assert main([*argv, "--resume"]) == 0
    assert "skipping checkpoint-4 has a damaged optimizer.pt" in capsys.readouterr().err
    a = json.loads((checkpointed["run"] / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    assert b["training"]["resumed_from"].endswith("checkpoint-2")
    assert b["metrics"]["eval_loss"] == pytest.approx(a["metrics"]["eval_loss"], abs=1e-6)
