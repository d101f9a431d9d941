"""--report-to: the Trainer's TensorBoard and MLflow integrations get loss, lr_A, lr_B, val_loss and drift."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_error_line

from oloraplus.errors import UserError
from oloraplus.training.config import TrainConfig
from oloraplus.training.recipe import train
from oloraplus.training.tracking import LOGS_FOLDER, check_backend

STEPS = 20  # the Trainer logs the train loss every 10 steps


def _run(checkpoint, data, out, report_to: str) -> dict:
    config = TrainConfig(output=str(out), model=str(checkpoint), data=str(data), method="olora-plus", ratio=4.0,
                         rank=4, lr=1e-2, n_train=18, n_eval=4, n_val=2, eval_steps=5, evaluate=False,
                         max_steps=STEPS, batch_size=2, track_dynamics=10, lr_scheduler="cosine",
                         warmup_ratio=0.1, precision="fp32", progress=False, export=False, report_to=report_to)
    return train(config)


def _expected(results: dict) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} as results.json and dynamics.jsonl record them."""
    return {
        "loss": {row["step"]: row["loss"] for row in results["training"]["log"]},
        "lr_A": {row["step"]: row["learning_rate"] for row in results["training"]["log"]},
        "val_loss": {row["step"]: row["val_loss"] for row in results["training"]["val_log"]},
    }


def test_tensorboard_event_file_holds_the_scalars_at_their_steps(tiny_checkpoint, records_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    results = _run(tiny_checkpoint, records_file, out, "tensorboard")
    logs = out / LOGS_FOLDER
    assert list(logs.glob("events.out.tfevents.*")), list(logs.iterdir())
    events = EventAccumulator(str(logs))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}

    expected = _expected(results)
    assert sorted(expected["loss"]) == [10, 20]
    for name, tag in (("loss", "train/loss"), ("lr_A", "train/lr_A"), ("val_loss", "train/val_loss")):
        assert scalars[tag].keys() == expected[name].keys(), (tag, scalars[tag])
        for step, value in expected[name].items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)
    assert sorted(expected["val_loss"]) == [5, 10, 15, 20]
    for step, lr_a in scalars["train/lr_A"].items():  # lr_B = ratio x lr_A, at the same steps
        assert scalars["train/lr_B"][step] == pytest.approx(4.0 * lr_a, rel=1e-6)

    drift = [json.loads(line) for line in (out / "dynamics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in drift] == [0, 10, 20]
    for name in ("b_subspace_drift", "b_rel_change"):
        got = scalars[f"train/{name}"]
        want = {row["step"]: row[name] for row in drift if row[name] is not None}
        assert got.keys() == want.keys(), (name, got)
        for step, value in want.items():
            assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_mlflow_local_store_holds_the_metrics(tiny_checkpoint, records_file, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "oloraplus-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    results = _run(tiny_checkpoint, records_file, tmp_path / "run", "mlflow")

    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("oloraplus-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    history = {name: {m.step: m.value for m in client.get_metric_history(run_id, name)}
               for name in ("loss", "lr_A", "lr_B", "val_loss", "b_subspace_drift")}
    expected = _expected(results)
    for name in ("loss", "lr_A", "val_loss"):
        assert history[name].keys() == expected[name].keys(), (name, history[name])
        for step, value in expected[name].items():
            assert history[name][step] == pytest.approx(value, rel=1e-6)
    assert history["lr_B"] == {step: pytest.approx(4.0 * v, rel=1e-6) for step, v in history["lr_A"].items()}
    assert sorted(history["b_subspace_drift"]) in ([0, 10, 20], [10, 20])  # step 0: drift may be None


def test_default_run_reports_nowhere(tiny_checkpoint, records_file, tmp_path):
    out = tmp_path / "run"
    results = _run(tiny_checkpoint, records_file, out, "none")
    assert not (out / LOGS_FOLDER).exists()
    assert all("lr_A" not in row for row in results["training"]["log"])  # log_history as before


@pytest.mark.parametrize("backend, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"),
                                             ("wandb", "wandb")])
def test_a_missing_backend_is_one_error_line_naming_the_extra(backend, module, records_file, tmp_path, capsys,
                                                              monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    argv = ["train", "--output", str(tmp_path / "o"), "--data", str(records_file), "--method", "olora",
            "--report-to", backend]
    assert_one_error_line(argv, capsys, f"--report-to {backend}", f"oloraplus[{backend}]")


def test_unknown_backend_is_refused():
    with pytest.raises(UserError, match="comet"):
        check_backend("comet")
    check_backend("none")
