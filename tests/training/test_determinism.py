"""Same seed, data and flags on the same machine: identical metrics and weights."""

from __future__ import annotations

import json

import pytest

from oloraplus.cli import main


def _run(checkpoint, data, out, seed: int, capsys) -> dict:
    argv = ["train", "--model", str(checkpoint), "--data", str(data), "--output", str(out),
            "--method", "olora-plus", "--ratio", "4", "--rank", "4", "--lr", "1e-2", "--seed", str(seed),
            "--n-train", "16", "--n-eval", "8", "--batch-size", "2", "--max-steps", "5",
            "--max-new-tokens", "6", "--precision", "fp32", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_same_seed_same_metrics(tiny_checkpoint, records_file, tmp_path, capsys):
    first = _run(tiny_checkpoint, records_file, tmp_path / "a", 0, capsys)
    second = _run(tiny_checkpoint, records_file, tmp_path / "b", 0, capsys)
    assert first["metrics"] == second["metrics"]
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "a" / adapter).read_bytes() == (tmp_path / "b" / adapter).read_bytes()
    assert (tmp_path / "a" / "predictions.jsonl").read_text() == (tmp_path / "b" / "predictions.jsonl").read_text()

    # The seed does reach training (batch order), so the equality above is not vacuous.
    other = _run(tiny_checkpoint, records_file, tmp_path / "c", 1, capsys)
    assert other["metrics"]["eval_loss"] != first["metrics"]["eval_loss"]
