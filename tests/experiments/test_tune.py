"""Validation during training (``--n-val``, ``--eval-steps``) and ``oloraplus tune`` (Optuna search on the
validation loss): tiny checkpoint, tiny trials."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest
from conftest import make_records

from oloraplus.cli import main
from oloraplus.data.records import DataSource
from oloraplus.data.split import split_records
from oloraplus.errors import UserError
from oloraplus.training.config import TrainConfig

TINY_RUN = ["--n-train", "24", "--n-eval", "4", "--max-new-tokens", "4", "--precision", "fp32", "--no-progress",
            "--rank", "4", "--batch-size", "4", "--metrics-mode", "teacher-forced"]


def source_of(n: int) -> DataSource:
    return DataSource(make_records(n), "fixture", "0" * 64)


def test_validation_is_carved_from_the_training_records_and_leaves_eval_unchanged():
    plain, carved = split_records(source_of(40), 24, 8, 5), split_records(source_of(40), 24, 8, 5, n_val=6)
    assert carved.eval_indices == plain.eval_indices  # the eval records do not depend on --n-val
    assert carved.train_indices + carved.val_indices == plain.train_indices  # the last 6 train records
    assert len(carved.train) == 18 and len(carved.val) == 6
    assert not set(carved.val_indices) & (set(carved.train_indices) | set(carved.eval_indices))
    assert carved.provenance["val_indices"] == carved.val_indices and carved.provenance["n_val"] == 6
    assert "val_indices" not in plain.provenance and plain.val == []  # n_val = 0: the split as before
    for n_val in (24, 30, -1, 2.5):
        with pytest.raises(UserError, match="--n-val"):
            split_records(source_of(40), 24, 8, 5, n_val=n_val)


@pytest.mark.parametrize("changes, needle", [
    ({"n_val": 24}, "below --n-train"),
    ({"eval_steps": 2}, "--n-val"),
    ({"evaluate": False}, "--n-val"),
    ({"n_val": 4, "eval_steps": 0}, "eval-steps"),
])
def test_validation_settings_are_checked(changes, needle):
    with pytest.raises(UserError, match=needle):
        TrainConfig(output="x", method="olora", n_train=24, **changes).validate()


def test_val_loss_is_eval_loss_on_the_validation_records(tiny_checkpoint, records_file, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oloraplus.data.tokenize import tokenize_records
    from oloraplus.evaluation.evaluate import eval_loss

    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_checkpoint), "--data", str(records_file), "--output", str(out),
                 "--method", "olora-plus", "--ratio", "4", "--max-steps", "3", "--n-val", "8", "--eval-steps", "2",
                 "--lr", "1e-2", *TINY_RUN])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "val_loss" in captured.out
    results = json.loads((out / "results.json").read_text())
    data = results["data"]
    train_idx, val_idx, eval_idx = data["train_indices"], data["val_indices"], data["eval_indices"]
    assert (len(train_idx), len(val_idx), len(eval_idx)) == (16, 8, 4)
    assert not (set(train_idx) & set(val_idx) or set(val_idx) & set(eval_idx) or set(train_idx) & set(eval_idx))
    assert results["config"]["n_val"] == 8 and results["config"]["eval_steps"] == 2
    log = results["training"]["val_log"]
    assert [row["step"] for row in log] == [2, 3]  # every 2 steps, and the end
    assert results["metrics"]["val_loss"] == log[-1]["val_loss"]
    assert math.isfinite(results["metrics"]["eval_loss"])  # the eval set is still evaluated

    # The same number from eval_loss on the saved adapter and the validation records.
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32),
                                      str(out / "adapter"))
    records = make_records(40)
    examples, _ = tokenize_records([records[i] for i in val_idx], tokenizer, 512)
    again = eval_loss(model, examples, tokenizer.pad_token_id, progress=False)["eval_loss"]
    assert again == pytest.approx(results["metrics"]["val_loss"], rel=1e-4)


def test_no_evaluate_skips_the_eval_set(tiny_checkpoint, records_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_checkpoint), "--data", str(records_file), "--output", str(out),
                 "--method", "olora", "--max-steps", "2", "--n-val", "4", "--no-evaluate", *TINY_RUN])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"val_loss"}
    assert [row["step"] for row in results["training"]["val_log"]] == [2]
    assert not (out / "predictions.jsonl").exists()


def tune_args(checkpoint, records_file, output, *more: str) -> list[str]:
    return ["tune", "--model", str(checkpoint), "--data", str(records_file), "--output", str(output),
            "--n-train", "24", "--n-val", "8", "--n-eval", "4", "--max-steps", "2", "--eval-steps", "1",
            "--rank", "4", "--batch-size", "4", "--precision", "fp32", "--max-length", "64", *more]


def study_trials(storage: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


@pytest.mark.slow
def test_tune_writes_best_parameters_trials_csv_and_figures(tiny_checkpoint, records_file, tmp_path, capsys):
    import csv

    from oloraplus.experiments.tune import TuneSpec, near_edge

    def spec_of(out):  # the searched ranges and settings of the command below
        return TuneSpec(model="m", methods=[], trials=2, output=str(out), lr_range=(1e-3, 1e-1),
                        ratio_range=(0.25, 4), flags={"n_train": 24})

    out = tmp_path / "tune"
    code = main(tune_args(tiny_checkpoint, records_file, out, "--methods", "olora", "olora-plus", "--trials", "2",
                          "--lr-range", "1e-3", "1e-1", "--ratio-range", "1/4", "4"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "olora-plus: best val_loss" in captured.out
    best = json.loads((out / "best.json").read_text())
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"olora", "olora-plus"}
    assert all(r["state"] in ("COMPLETE", "PRUNED") for r in rows)
    for method in ("olora", "olora-plus"):
        entry = best["methods"][method]
        assert entry["trials"]["COMPLETE"] + entry["trials"]["PRUNED"] == 2
        assert 1e-3 <= entry["params"]["lr"] <= 1e-1
        complete = [r for r in rows if r["method"] == method and r["state"] == "COMPLETE"]
        assert entry["val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in complete))
        # the objective is the trial run's validation loss, never an eval metric
        trial = json.loads((out / "trials" / method / f"{entry['trial']:04d}" / "results.json").read_text())
        assert trial["metrics"] == {"val_loss": entry["val_loss"]}
        # the best setting as a train config: the final run of seed 0, as --final-seeds trains it
        from oloraplus.training.config import read_settings

        assert f"{method}: train it with: oloraplus train --config {out / f'best_{method}.yaml'}" in captured.out
        saved = read_settings(entry["train_config"], {f.name for f in fields(TrainConfig)})
        final = spec_of(out).final_spec(method, entry["params"], seed=0)
        assert saved["lr"] == entry["params"]["lr"] and saved.get("ratio") == entry["params"].get("ratio")
        assert (saved["n_val"], saved["eval_steps"], saved["evaluate"], saved["method"]) == (0, None, True, method)
        assert saved["data_seed"] == final.flags["data_seed"] and saved["n_train"] == 24
        # the edge check, as the command prints it
        assert entry["near_edge"] == near_edge(spec_of(out), entry["params"])
        for edge in entry["near_edge"]:
            flag, side = edge.rsplit(" ", 1)
            assert f"{method}: the best setting is near the {side} end of {flag}" in captured.out
    assert "ratio" not in best["methods"]["olora"]["params"]
    assert 0.25 <= best["methods"]["olora-plus"]["params"]["ratio"] <= 4
    assert (out / "figure_val_loss_vs_lr.png").stat().st_size > 0
    assert (out / "figure_heatmap_olora-plus.png").stat().st_size > 0
    assert not (out / "figure_heatmap_olora.png").exists()

    # Resumable: the study is the state, so the same command with a larger budget runs only the missing trials.
    code = main(tune_args(tiny_checkpoint, records_file, out, "--methods", "olora", "--trials", "3",
                          "--lr-range", "1e-3", "1e-1"))
    assert code == 0, capsys.readouterr().err
    olora = study_trials(f"sqlite:///{out / 'optuna.db'}", f"oloraplus.{tiny_checkpoint_name(tiny_checkpoint)}.olora")
    assert len(olora) == 3 and len(list(csv.DictReader((out / "trials.csv").open()))) == 3
    # ... and a study made with other settings is refused.
    code = main(tune_args(tiny_checkpoint, records_file, out, "--methods", "olora", "--trials", "3",
                          "--lr-range", "1e-4", "1e-1"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "lr_range" in err
    # --trials 0: no trial run; the outputs of both studies as they are, written elsewhere
    shown = tmp_path / "shown"
    code = main(tune_args(tiny_checkpoint, records_file, shown, "--methods", "olora", "olora-plus", "--trials", "0",
                          "--lr-range", "1e-3", "1e-1", "--ratio-range", "1/4", "4",
                          "--storage", f"sqlite:///{out / 'optuna.db'}"))
    assert code == 0, capsys.readouterr().err
    name = f"oloraplus.{tiny_checkpoint_name(tiny_checkpoint)}"
    assert len(study_trials(f"sqlite:///{out / 'optuna.db'}", f"{name}.olora")) == 3  # nothing run
    assert len(study_trials(f"sqlite:///{out / 'optuna.db'}", f"{name}.olora-plus")) == 2
    assert len(list(csv.DictReader((shown / "trials.csv").open()))) == 5
    counts = json.loads((shown / "best.json").read_text())["methods"]["olora"]["trials"]
    assert counts["COMPLETE"] + counts["PRUNED"] == 3
    assert (shown / "figure_heatmap_olora-plus.png").stat().st_size > 0 and not (shown / "trials").exists()


def tiny_checkpoint_name(path) -> str:
    from oloraplus.experiments.grid import safe_name

    return safe_name(str(path))


@pytest.mark.parametrize("storage, needle", [
    ("nosuchdb://localhost/x", "not a storage URL"),
    ("sqlite:///{tmp}/no/such/folder/x.db", "cannot open --storage"),
    ("optuna.db", "not a storage URL"),
])
def test_a_bad_storage_url_is_one_error_line(storage, needle, tiny_checkpoint, records_file, tmp_path, capsys):
    code = main(tune_args(tiny_checkpoint, records_file, tmp_path / "tune", "--trials", "1",
                          "--storage", storage.format(tmp=tmp_path)))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_tune_settings_are_checked_before_anything_runs(tiny_checkpoint, records_file, tmp_path, capsys):
    for more, needle in ((["--n-val", "0"], "--n-val"), (["--workers", "999"], "cores"),
                         (["--lr-range", "1e-2", "1e-3"], "--lr-range"),
                         (["--tune-dropout", "--dropout", "0.1"], "--tune-dropout")):
        argv = tune_args(tiny_checkpoint, records_file, tmp_path / "tune", "--trials", "1", *more)
        if more[0] == "--n-val":
            argv.remove("8"), argv.remove("--n-val")
            argv += ["--n-val", "0"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "tune" / "optuna.db").exists()


def test_tune_takes_train_flags_from_a_config_file_but_not_the_searched_ones(tiny_checkpoint, records_file, tmp_path,
                                                                             capsys):
    config = tmp_path / "tune.yaml"
    config.write_text("seed: 3\nrank: 8\n")
    assert main(tune_args(tiny_checkpoint, records_file, tmp_path / "tune", "--trials", "1", "--methods", "olora",
                          "--config", str(config))) == 0
    capsys.readouterr()
    trial = json.loads((tmp_path / "tune" / "trials" / "olora" / "0000" / "results.json").read_text())
    assert (trial["config"]["seed"], trial["config"]["rank"]) == (3, 4)  # flags on the command line win
    assert (trial["config"]["n_val"], trial["config"]["evaluate"]) == (8, False)
    config.write_text("lr: 1e-3\n")
    assert main(tune_args(tiny_checkpoint, records_file, tmp_path / "tune", "--trials", "1", "--config",
                          str(config))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'lr' does not apply to this command" in err, err


def test_a_best_setting_near_an_end_of_its_range_is_flagged():
    from oloraplus.experiments.tune import TuneSpec, near_edge

    spec = TuneSpec(model="m", methods=["olora-plus"], trials=1, output="unused", lr_range=(1e-6, 1e-2),
                    ratio_range=(1 / 64, 64.0), dropout_range=(0.0, 0.2))
    assert near_edge(spec, {"lr": 3e-4, "ratio": 0.5, "dropout": 0.1}) == []
    assert near_edge(spec, {"lr": 1.9e-6, "ratio": 0.5}) == ["--lr-range low"]  # within 2x of 1e-6
    assert near_edge(spec, {"lr": 2.1e-6, "ratio": 0.5}) == []
    assert near_edge(spec, {"lr": 6e-3, "ratio": 40.0}) == ["--lr-range high", "--ratio-range high"]
    assert near_edge(spec, {"lr": 3e-4, "ratio": 1 / 40}) == ["--ratio-range low"]
    assert near_edge(spec, {"lr": 3e-4, "dropout": 0.0}) == []  # no dropout is an answer, not an edge
    assert near_edge(spec, {"lr": 3e-4, "dropout": 0.19}) == ["--dropout-range high"]
    untuned = TuneSpec(model="m", methods=["olora"], trials=1, output="unused", dropout_range=None)
    assert near_edge(untuned, {"lr": 1e-4, "dropout": 0.05}) == []  # a fixed dropout has no range


def test_the_figures_loss_axis_stops_15_percent_above_the_best_only_when_something_lies_beyond():
    from oloraplus.experiments.tune_figures import loss_cap

    assert loss_cap([]) is None
    assert loss_cap([1.9, 2.0, 2.1]) is None  # all within 15% of 1.9: the natural range
    assert loss_cap([1.9, 2.0, 9.3]) == pytest.approx(1.9 * 1.15)  # a diverged trial: capped


@pytest.mark.slow
def test_two_worker_processes_share_one_sqlite_study_without_duplicates(tiny_checkpoint, records_file, tmp_path,
                                                                         capsys):
    out = tmp_path / "tune"
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    code = main(tune_args(tiny_checkpoint, records_file, out, "--methods", "olora-plus", "--trials", "4",
                          "--workers", "2", "--storage", storage))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    trials = study_trials(storage, f"oloraplus.{tiny_checkpoint_name(tiny_checkpoint)}.olora-plus")
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    params = [(t.params["lr"], t.params["ratio"]) for t in finished]
    assert len(set(params)) == len(params)
    # the only other trials a race can leave: started as the budget filled up, marked FAIL, never counted
    assert all(t.user_attrs.get("note", "").startswith("over budget") for t in trials if t not in finished)
    assert len({t.user_attrs["output"] for t in finished}) == 4


@pytest.mark.slow
def test_a_worker_moves_on_to_the_next_method_instead_of_waiting(tiny_checkpoint, records_file, tmp_path, capsys):
    # one trial per method and two workers: the second finds the first method taken and starts the
    # second at once, so the two trials overlap in time (a worker that waited would start it only
    # after the first finished)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    code = main(tune_args(tiny_checkpoint, records_file, tmp_path / "tune", "--methods", "olora", "olora-plus",
                          "--trials", "1", "--workers", "2", "--storage", storage,
                          "--max-steps", "40", "--eval-steps", "40"))  # trials of some seconds
    captured = capsys.readouterr()
    assert code == 0, captured.err
    name = f"oloraplus.{tiny_checkpoint_name(tiny_checkpoint)}"
    done = {}
    for method in ("olora", "olora-plus"):
        finished = [t for t in study_trials(storage, f"{name}.{method}") if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(finished) == 1
        done[method] = finished[0]
    first, second = sorted(done.values(), key=lambda t: t.datetime_start)
    assert second.datetime_start < first.datetime_complete, (first.datetime_start, first.datetime_complete,
                                                              second.datetime_start)


@pytest.mark.slow
def test_a_killed_workers_trial_does_not_count_and_is_replaced_on_resume(tiny_checkpoint, records_file, tmp_path,
                                                                          capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "tune"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    name = f"oloraplus.{tiny_checkpoint_name(tiny_checkpoint)}.olora"
    argv = tune_args(tiny_checkpoint, records_file, out, "--methods", "olora", "--trials", "2", "--storage", storage,
                     "--heartbeat", "1", "--max-steps", "40", "--eval-steps", "40")  # a trial of some seconds
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "oloraplus", *argv], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline, killed = time.monotonic() + 120, None
        while killed is None and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.1)
            try:
                running = [t for t in study_trials(storage, name) if t.state.name == "RUNNING"]
            except Exception:  # the database or the study is not there yet
                continue
            if running:
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait()
                killed = running[0].number
        assert killed is not None, worker.stderr.read() if worker.poll() is not None else "no trial started"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    state = {t.number: t.state.name for t in study_trials(storage, name)}
    assert state[killed] == "RUNNING"  # not COMPLETE: the worker died inside it

    code = main(argv)  # the same command resumes the study
    captured = capsys.readouterr()
    assert code == 0, captured.err
    trials = study_trials(storage, name)
    by_number = {t.number: t for t in trials}
    assert by_number[killed].state.name == "FAIL"  # found stale by its heartbeat
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 2 and killed not in {t.number for t in finished}
    assert json.loads((out / "best.json").read_text())["methods"]["olora"]["trials"]["FAIL"] == 1


def test_measuring_the_validation_loss_does_not_change_training(tiny_checkpoint, records_file, tmp_path):
    from oloraplus.training.recipe import train

    def run(name: str, **more) -> dict:
        return train(TrainConfig(output=str(tmp_path / name), model=str(tiny_checkpoint), data=str(records_file),
                                 method="olora-plus", ratio=4.0, lr=1e-2, dropout=0.1, n_train=24, n_eval=4, n_val=8,
                                 max_steps=3, rank=4, batch_size=4, precision="fp32", progress=False,
                                 evaluate=False, **more))

    quiet, watched = run("quiet"), run("watched", eval_steps=1)
    assert [row["step"] for row in watched["training"]["val_log"]] == [1, 2, 3]
    assert [row["step"] for row in quiet["training"]["val_log"]] == [3]
    assert watched["training"]["train_loss"] == quiet["training"]["train_loss"]
    assert watched["metrics"]["val_loss"] == quiet["metrics"]["val_loss"]


def test_a_pruned_trial_stops_training_and_leaves_no_finished_run(tiny_checkpoint, records_file, tmp_path):
    import optuna

    from oloraplus.experiments.tune import PruningCallback
    from oloraplus.training.recipe import train

    class Trial:  # what PruningCallback uses of an optuna.Trial
        reported: list = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return True

    trial = Trial()
    out = tmp_path / "trial"
    config = TrainConfig(output=str(out), model=str(tiny_checkpoint), data=str(records_file), method="olora",
                         n_train=24, n_eval=4, n_val=8, eval_steps=1, max_steps=3, rank=4, batch_size=4,
                         precision="fp32", progress=False, evaluate=False)
    with pytest.raises(optuna.TrialPruned):
        train(config, callbacks=[PruningCallback(trial)])
    assert [step for step, _ in trial.reported] == [1]
    assert not (out / "results.json").exists()


def test_a_study_from_before_a_new_train_setting_resumes_only_at_that_settings_default():
    """A study keeps working when TrainConfig gains a field later, as long as the field is left at
    its default (what the study's trials ran with); set otherwise, it is a difference."""
    from oloraplus.experiments.tune import _differences

    stored = {"method": "olora", "train": {"rank": 32}}
    assert _differences(stored, {"method": "olora", "train": {"rank": 32, "format": "auto"}}) == []
    assert _differences(stored, {"method": "olora", "train": {"rank": 32, "format": "chat"}}) == [
        "train.format: None there, 'chat' now"]
    assert _differences(stored, {"method": "olora", "train": {"rank": 16}}) == ["train.rank: 32 there, 16 now"]


def fake_trial(config, callbacks=()):
    """A trial without training: the validation loss is a fixed function of lr (and lambda)."""
    if config.method == "pissa":
        return {"metrics": {"val_loss": math.nan}, "training": {"steps": 2}}  # diverged: counted as pruned
    penalty = 0.0 if config.ratio is None else 0.01 * math.log2(config.ratio) ** 2
    return {"metrics": {"val_loss": 1 + (math.log10(config.lr) + 2.5) ** 2 + penalty}, "training": {"steps": 2}}


def fake_final_run(calls: list):
    """A final run without training: results.json and eval_losses.json as train writes them (the parts read)."""
    from dataclasses import asdict
    from pathlib import Path

    import numpy as np

    def train(config):
        calls.append(config)
        out = Path(config.output)
        out.mkdir(parents=True, exist_ok=True)
        shared = np.random.default_rng(config.seed)  # the eval records of a seed: the same for every method
        indices = [int(i) for i in shared.permutation(1000)[:40]]
        tokens = shared.integers(3, 20, 40)
        base = shared.gamma(3.0, 0.5, 40)
        noise = np.random.default_rng([config.seed, len(config.method)]).normal(0, 0.01, 40)
        loss_sum = (base + (0.3 if config.method == "olora" else 0.0) + noise) * tokens
        losses = {"format": 1, "eval_indices": indices, "response_loss_sum": loss_sum.tolist(),
                  "response_tokens": tokens.tolist(), "sequence_loss_sum": (2 * loss_sum).tolist(),
                  "sequence_tokens": (3 * tokens).tolist()}
        eval_loss = float(loss_sum.sum() / tokens.sum())
        results = {"metrics": {"eval_loss": eval_loss, "bleu": 20.0 - eval_loss, "rougeL": 40.0 - eval_loss},
                   "config": asdict(config), "data": {"eval_indices": sorted(indices)}}
        (out / "eval_losses.json").write_text(json.dumps(losses))
        (out / "results.json").write_text(json.dumps(results))
        return results

    return train


@pytest.fixture
def final_calls(monkeypatch) -> list:
    """Instant trials and final runs (fake_trial, fake_final_run); the list of the final runs' configs."""
    calls: list = []
    monkeypatch.setattr("oloraplus.experiments.tune.train", fake_trial)
    monkeypatch.setattr("oloraplus.experiments.grid.train", fake_final_run(calls))
    return calls


def test_final_seeds_run_each_methods_best_trial_per_seed_resumably_and_write_the_report(
        tiny_checkpoint, records_file, tmp_path, capsys, final_calls):
    import csv

    calls = final_calls

    out = tmp_path / "tune"
    argv = tune_args(tiny_checkpoint, records_file, out, "--methods", "olora", "olora-plus", "--trials", "4",
                     "--lr-range", "1e-4", "1e-1", "--ratio-range", "1/4", "4", "--data-seed", "7", "--seed", "3",
                     "--final-seeds", "2")
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = list(csv.DictReader((out / "trials.csv").open()))
    folders = sorted(p.name for p in (out / "final").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert folders == ["olora-plus-s0", "olora-plus-s1", "olora-s0", "olora-s1"]
    assert len(calls) == 4
    for config in calls:
        method, seed = config.method, config.seed
        assert config.output.endswith(f"final/{method}-s{seed}")
        complete = [r for r in rows if r["method"] == method and r["state"] == "COMPLETE"]
        best = min(complete, key=lambda r: (float(r["val_loss"]), int(r["number"])))
        assert config.lr == float(best["lr"])
        assert config.ratio == (float(best["ratio"]) if method == "olora-plus" else None)
        assert config.data_seed == 7 + seed  # the study's data seed + s; the trials' training seed is not used
        assert (config.n_val, config.eval_steps, config.evaluate) == (0, None, True)
        assert (config.max_steps, config.rank, config.n_train) == (2, 4, 24)  # the study's other settings
        assert config.metrics_mode == "generation"
    assert sorted((c.method, c.seed) for c in calls) == [("olora", 0), ("olora", 1), ("olora-plus", 0),
                                                          ("olora-plus", 1)]
    assert [c.seed for c in calls] == [0, 0, 1, 1]  # seed-major: a stopped run already holds pairs
    report = (out / "report.md").read_text()
    assert "| OLoRA+ − OLoRA |" in report and "olora-plus better" in report
    assert (out / "comparisons.csv").exists() and (out / "final" / "runs.jsonl").exists()

    # Resumable: the same command skips the finished runs.
    assert main(argv) == 0, capsys.readouterr().err
    assert len(calls) == 4
    # A run deleted is redone, alone.
    import shutil

    shutil.rmtree(out / "final" / "olora-s1")
    assert main(argv) == 0, capsys.readouterr().err
    assert [(c.method, c.seed) for c in calls[4:]] == [("olora", 1)]
    # Another command (another budget) adds its methods to the same final/; the report covers all of them,
    # with the trials of every study in the storage (OUTPUT/trials.csv holds the last command's only).
    more = tune_args(tiny_checkpoint, records_file, out, "--methods", "lora", "--trials", "2", "--lr-range", "1e-4",
                     "1e-1", "--data-seed", "7", "--seed", "3", "--final-seeds", "2")
    assert main(more) == 0, capsys.readouterr().err
    assert [(c.method, c.seed) for c in calls[5:]] == [("lora", 0), ("lora", 1)]
    assert {r["method"] for r in csv.DictReader((out / "trials.csv").open())} == {"lora"}
    every = list(csv.DictReader((out / "final" / "trials.csv").open()))
    assert [r["method"] for r in every] == ["lora"] * 2 + ["olora"] * 4 + ["olora-plus"] * 4
    report = (out / "report.md").read_text()
    assert "| LoRA − OLoRA |" in report and "no complete trial" not in report


def test_final_runs_shared_with_another_process_leave_the_report_to_the_last_one(
        tiny_checkpoint, records_file, tmp_path, capsys, final_calls):
    from oloraplus.experiments.grid import claim_path
    from oloraplus.outputs import shared_work_claim

    calls = final_calls
    out = tmp_path / "tune"
    argv = tune_args(tiny_checkpoint, records_file, out, "--methods", "olora", "olora-plus", "--trials", "2",
                     "--final-seeds", "1")
    with shared_work_claim(claim_path(out / "final", "olora-plus-s0")):  # "another process" runs this one
        code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [(c.method, c.seed) for c in calls] == [("olora", 0)]
    assert "1 final run(s) still running in another process (olora-plus-s0)" in captured.out
    assert not (out / "report.md").exists()
    assert main(argv) == 0, capsys.readouterr().err  # the last process (here: the same command again)
    assert [(c.method, c.seed) for c in calls] == [("olora", 0), ("olora-plus", 0)]
    assert "| OLoRA+ − OLoRA |" in (out / "report.md").read_text()


def test_final_seeds_need_a_complete_trial_per_method(tiny_checkpoint, records_file, tmp_path, capsys, final_calls):
    calls = final_calls
    argv = tune_args(tiny_checkpoint, records_file, tmp_path / "tune", "--methods", "olora", "pissa", "--trials", "2",
                     "--final-seeds", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "pissa has no complete trial" in err, err
    assert calls == []  # checked before any final run
    assert main(argv[:-2] + ["--final-seeds", "-1"]) == 2
    assert "--final-seeds" in capsys.readouterr().err


def test_widen_resumes_a_study_with_wider_ranges_and_records_it(tiny_checkpoint, records_file, tmp_path, capsys,
                                                                final_calls):
    """The edge rule's mechanism: a wider --lr-range is refused without --widen (one error line that names
    it), accepted with it; the finished trials keep counting, the next ones search the wider range, and the
    widening is recorded in the study and best.json. A narrower range or another setting is still refused."""
    out = tmp_path / "tune"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    name = f"oloraplus.{tiny_checkpoint_name(tiny_checkpoint)}.olora-plus"
    base = tune_args(tiny_checkpoint, records_file, out, "--methods", "olora-plus", "--storage", storage)
    assert main(base + ["--trials", "3", "--lr-range", "1e-4", "1e-2"]) == 0, capsys.readouterr().err

    import optuna

    before = optuna.load_study(study_name=name, storage=storage).user_attrs["settings"]
    wider = base + ["--trials", "5", "--lr-range", "1e-5", "1e-1"]
    assert main(wider) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--widen" in err, err
    assert len(study_trials(storage, name)) == 3  # nothing ran

    assert main(wider + ["--widen"]) == 0, capsys.readouterr().err
    trials = study_trials(storage, name)
    assert len(trials) == 5
    assert [(t.distributions["lr"].low, t.distributions["lr"].high) for t in trials] == [(1e-4, 1e-2)] * 3 + [
        (1e-5, 1e-1)] * 2
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.user_attrs["settings"] == {**before, "lr_range": [1e-5, 1e-1]}  # the rest as the trials ran
    [record] = study.user_attrs["widened"]
    assert record["lr_range"] == [[1e-4, 1e-2], [1e-5, 1e-1]] and record["after_finished_trials"] == 3
    assert "ratio_range" not in record
    best = json.loads((out / "best.json").read_text())
    assert best["methods"]["olora-plus"]["widened"] == [record]

    assert main(wider) == 0, capsys.readouterr().err  # the wider range is now the study's own: no --widen needed
    for refused in (["--lr-range", "1e-4", "1e-1"], ["--lr-range", "1e-5", "1e-1", "--rank", "8"]):
        assert main(base + ["--trials", "6", "--widen", *refused]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "other settings" in err, err
    assert len(study_trials(storage, name)) == 5


def test_the_first_trial_after_a_widening_searches_the_new_range():
    """Plain multivariate TPE draws lr for the first trials after a widening from the old range (its joint
    search space keeps the old distribution until a widened trial has finished): the tripwire below. Our
    sampler draws it over the new range from the first trial on. Twelve finished trials on [1e-4, 1e-2]
    put the best lr at the old top, so TPE's draws over [1e-4, 1e-1] often land above 1e-2."""
    import optuna

    from oloraplus.experiments.tune import TuneSpec, _sampler_and_pruner, search_space

    old = TuneSpec(model="m", methods=["olora-plus"], trials=30, output="o", lr_range=(1e-4, 1e-2))
    new = TuneSpec(model="m", methods=["olora-plus"], trials=30, output="o", lr_range=(1e-4, 1e-1))
    old_space, new_space = search_space(old), search_space(new)

    def first_draws(sampler) -> list[float]:
        study = optuna.create_study(sampler=sampler)
        for i in range(12):
            lr, ratio = 10 ** (-4 + 2 * i / 11), 2.0 ** ((i % 5) - 2)
            study.add_trial(optuna.trial.create_trial(params={"lr": lr, "ratio": ratio}, distributions=old_space,
                                                      value=(math.log10(lr) + 1.5) ** 2 + 0.01 * ratio))
        draws = []
        for _ in range(40):  # each one the first trial after the widening: the others fail (never count)
            trial = study.ask()
            draws.append(trial.suggest_float("lr", new_space["lr"].low, new_space["lr"].high, log=True))
            trial.suggest_float("ratio", new_space["ratio"].low, new_space["ratio"].high, log=True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return draws

    plain = first_draws(optuna.samplers.TPESampler(multivariate=True, constant_liar=True))
    assert max(plain) <= 1e-2, "Optuna's TPE now draws widened ranges itself: TPEOnTheSearchedRanges can go"
    ours = first_draws(_sampler_and_pruner(new)[0])
    assert sum(lr > 1e-2 for lr in ours) >= 4, ours
    assert all(1e-4 <= lr <= 1e-1 for lr in ours)
