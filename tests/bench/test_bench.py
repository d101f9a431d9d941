"""``oloraplus bench`` end to end on a tiny checkpoint: what it writes, and its one-line errors.

Speeds are not asserted (they belong to the benchmark's own output); what must hold on any
machine is asserted: both stacks ran on the same records, our batched greedy decoding gave the
same text as the one-prompt-at-a-time ``model.generate`` loop, and the JSON is complete.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import make_records

from bench.harness import PAPER_SIZE, run_bench
from oloraplus.cli import main
from oloraplus.training.runtime import resolve_precision

pytestmark = pytest.mark.slow  # the bench harness trains in child processes


@pytest.fixture
def bench_records(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(make_records(200)))
    return path


def test_bench_on_a_tiny_checkpoint(tiny_checkpoint, bench_records, tmp_path, capsys):
    out = tmp_path / "bench.json"
    sizes = {"n_train": 32, "n_eval": 16, "generation_prompts": 16, "max_new_tokens": 8, "orders": 2}
    run_bench([str(tiny_checkpoint)], quick=True, output=str(out), data=str(bench_records), sizes=sizes)
    printed = capsys.readouterr().out
    assert "train tokens/s (useful)" in printed and str(out) in printed

    result = json.loads(out.read_text())
    (r,) = result["models"].values()
    assert {k: r["config"][k] for k in sizes} == sizes
    train = r["train"]
    # all three stacks trained on each data order; a speed-up is the ratio of the medians
    for stack in ("reference", "configured", "ours"):
        orders = train[f"{stack}_tokens_per_second_orders"]
        assert len(orders) == 2 and train[f"{stack}_tokens_per_second"] == pytest.approx(sum(orders) / 2)
        losses = train[f"{stack}_eval_loss_orders"]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        assert train[f"{stack}_eval_loss_spread"] == pytest.approx(abs(losses[0] - losses[1]) / (sum(losses) / 2))
        # the training's own peak (VmHWM after a reset) is part of the process's (getrusage, page rounding)
        assert 0 < train[f"{stack}_train_peak_rss_mb"] <= 1.01 * train[f"{stack}_peak_rss_mb"]
        assert train[f"{stack}_eval_loss_orders"][0] == train[f"{stack}_eval_loss"]
    # a different data order trains a different model
    assert train["ours_eval_loss_orders"][0] != train["ours_eval_loss_orders"][1]
    # the configured Trainer uses bf16 where this CPU has it, the defaults never
    assert train["configured_precision"] == resolve_precision("auto", "cpu") and train["reference_precision"] == "fp32"
    # length-grouped batches and another precision train another model than the defaults
    assert train["configured_eval_loss"] != train["reference_eval_loss"]
    for other, key in (("reference", "speedup"), ("configured", "speedup_vs_configured")):
        assert train[key] == pytest.approx(train["ours_tokens_per_second"] / train[f"{other}_tokens_per_second"])
        assert train[f"{key}_orders"] == pytest.approx(
            [o / r for o, r in zip(train["ours_tokens_per_second_orders"], train[f"{other}_tokens_per_second_orders"])])
    gen = r["generation"]
    assert gen["prompts"] == 16
    assert gen["identical_share"] == 1.0  # fp32 batched greedy decoding == model.generate, prompt by prompt
    assert gen["ours_new_tokens"] == gen["loop_new_tokens"] > 0
    assert r["overhead"]["step_seconds_ratio1"] > 0 and r["init"]["ours_seconds"] > 0
    assert r["useful_flops_per_token"] > 0 and 0 < r["roofline_fraction"]
    assert result["peak"]["bf16_gflops"] > 0 and result["wall_seconds"] > 0
    assert len(result["load_average"]["start"]) == len(result["load_average"]["end"]) == 3


def test_paper_size_rows_on_a_small_shape(bench_records, tmp_path, capsys):
    """The paper-size rows: a random Llama of the given shape with a BPE tokenizer of its vocabulary,
    each stack with and without gradient checkpointing, its training peak RSS and the ratios."""
    shape = {**PAPER_SIZE["shape"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 400}
    out = tmp_path / "bench.json"
    run_bench([], quick=True, output=str(out), data=str(bench_records),
              paper_size={"shape": shape, "n_train": 16, "batch_size": 8})
    assert "paper size" in capsys.readouterr().out
    rows = json.loads(out.read_text())["paper_size"]["rows"]
    for suffix in ("", "_checkpointing"):
        for stack in ("reference", "configured", "ours"):
            r = rows[stack + suffix]
            assert r["tokens"] > 0 and r["tokens_per_second"] > 0
            assert 0 < r["train_peak_rss_mb"] <= 1.01 * r["peak_rss_mb"]
        assert rows["speedup_vs_configured" + suffix] == pytest.approx(
            rows["ours" + suffix]["tokens_per_second"] / rows["configured" + suffix]["tokens_per_second"])
        assert rows["train_peak_rss_vs_configured" + suffix] == pytest.approx(
            rows["ours" + suffix]["train_peak_rss_mb"] / rows["configured" + suffix]["train_peak_rss_mb"])
    assert rows["ours"]["tokens"] == rows["reference"]["tokens"] == rows["configured_checkpointing"]["tokens"]


@pytest.mark.parametrize("case", ["unknown model", "too few records", "output is a folder"])
def test_bench_bad_input_is_one_line(case, tiny_checkpoint, bench_records, records_file, tmp_path, capsys):
    argv = {"model": str(tiny_checkpoint), "data": str(bench_records), "output": str(tmp_path / "b.json")}
    if case == "unknown model":
        argv["model"] = "no-such-model"
    elif case == "too few records":
        argv["data"] = str(records_file)  # 40 records
    else:
        argv["output"] = str(tmp_path)
    code = main(["bench", "--quick", *[f"--{k}={v}" for k, v in argv.items()]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "b.json").exists()
