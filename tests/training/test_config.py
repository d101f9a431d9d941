"""One definition of the run settings: ``TrainConfig``'s fields give the flags of ``train``,
``evaluate``, ``reproduce`` and ``sweep``, the keys of ``--config`` files and
``results.json["config"]``; ``train --print-config`` writes a file that repeats the run."""

from __future__ import annotations

import json
from dataclasses import asdict, fields

import pytest
import yaml
from conftest import assert_one_error_line
from transformers.utils import logging as hf_logging

import oloraplus.experiments.grid as grid
import oloraplus.training.recipe as recipe
from oloraplus.cli import build_parser, main
from oloraplus.errors import UserError
from oloraplus.experiments.grid import PRESETS, TRAIN_FLAGS
from oloraplus.method.registry import METHODS
from oloraplus.training.config import EVALUATE_FIELDS, TrainConfig, read_config_file

TINY = ["--n-train", "16", "--n-eval", "8", "--max-new-tokens", "8", "--max-steps", "2", "--rank", "4",
        "--precision", "fp32", "--no-progress"]


def print_config(argv: list[str], capsys) -> str:
    """The YAML ``oloraplus train --print-config`` writes for ``argv``."""
    code = main(["train", *argv, "--print-config"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    return captured.out


def resolved(argv: list[str], capsys) -> TrainConfig:
    return TrainConfig(**yaml.safe_load(print_config(argv, capsys)))


def assert_one_line_error(argv: list[str], capsys, *needles: str) -> str:
    return assert_one_error_line(argv, capsys, *needles)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------ flags derive from the fields


def test_every_field_has_a_train_flag_with_help(capsys):
    text = help_text("train", capsys)
    for f in fields(TrainConfig):
        assert f"  {flag(f.name)} " in text or f"  {flag(f.name)}\n" in text, f.name
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help"
        if f.default is True:  # a setting on by default is turned off by --no-X
            assert f"--no-{flag(f.name)[2:]}" in text, f.name
    assert "--n_train" not in text  # HfArgumentParser's other spelling is accepted, not listed
    assert "x on CPU" not in text and " s (" not in text  # no timings in the help


def test_defaults_come_from_the_dataclass(capsys):
    assert resolved(["--output", "o", "--method", "olora"], capsys) == TrainConfig(output="o", method="olora")


def test_flag_spellings_and_types(capsys):
    config = resolved(["--output", "o", "--method", "olora-plus", "--ratio", "1/16", "--n_train", "7",
                       "--max-new-tokens", "9", "--no-progress", "--no-group-by-length", "--compile",
                       "--overwrite", "--target-modules", "q_proj", "v_proj", "--alpha", "8"], capsys)
    assert config.ratio == 0.0625 and type(config.ratio) is float
    assert (config.n_train, config.max_new_tokens, config.alpha) == (7, 9, 8.0)
    assert (config.progress, config.group_by_length, config.compile, config.fast, config.overwrite) == (
        False, False, True, True, True)
    assert config.target_modules == ["q_proj", "v_proj"]
    config = resolved(["--output", "o", "--method", "olora", "--no-fast", "--compile", "false", "--resume"], capsys)
    assert (config.fast, config.compile, config.resume) == (False, False, True)
    assert resolved(["--output", "o", "--method", "olora", "--fast"], capsys).fast is True


def test_method_choices_are_the_registry(capsys):
    text = help_text("train", capsys)
    assert "{" + ",".join(METHODS) + "}" in text
    for name, method in METHODS.items():
        extra = ["--ratio", "4"] if method.takes_ratio else []
        assert resolved(["--output", "o", "--method", name, *extra], capsys).method == name
    assert_one_line_error(["train", "--output", "o", "--method", "dora"], capsys, "argument --method: invalid choice")


def test_evaluate_and_grid_flags_are_subsets_of_train(capsys):
    evaluate = help_text("evaluate", capsys)
    assert all(flag(name) in evaluate for name in EVALUATE_FIELDS) and "--adapter" in evaluate
    assert "--rank" not in evaluate and "--method" not in evaluate
    for command in ("sweep", "reproduce"):
        text = help_text(command, capsys)
        assert all(flag(name) in text for name in TRAIN_FLAGS), command
        assert "--no-progress" in text and "--no-fast" in text
    assert set(TRAIN_FLAGS) == {f.name for f in fields(TrainConfig)} - {"output", "model", "method", "ratio",
                                                                          "seed", "overwrite", "evaluate"}


# ------------------------------------------------------------------ --config files


def test_file_values_are_defaults_and_flags_override_them(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    # text numbers as people write them: 3e-4 is a string to YAML 1.1, 1/16 a fraction
    path.write_text("output: out\nmethod: olora-plus\nratio: 1/16\nrank: 4\nlr: 3e-4\nn-train: 20\n"
                    "progress: false\ntarget_modules: [q_proj]\n")
    config = resolved(["--config", str(path)], capsys)
    assert (config.output, config.method, config.ratio, config.rank, config.lr, config.n_train) == (
        "out", "olora-plus", 0.0625, 4, 3e-4, 20)
    assert config.progress is False and config.target_modules == ["q_proj"]
    config = resolved(["--rank", "8", "--config", str(path), "--ratio", "4", "--progress", "--output", "other"],
                      capsys)
    assert (config.rank, config.ratio, config.progress, config.output, config.lr) == (8, 4.0, True, "other", 3e-4)


def test_json_file_and_required_flags_from_the_file(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"output": "o", "method": "olora", "max_steps": 3}))
    config = resolved(["--config", str(path)], capsys)
    assert (config.output, config.method, config.max_steps) == ("o", "olora", 3)
    path.write_text(json.dumps({"output": "o"}))
    assert_one_line_error(["train", "--config", str(path)], capsys, "required", "--method")


def test_print_config_round_trip(tmp_path, capsys):
    argv = ["--output", "o", "--method", "olora-plus", "--ratio", "1/16", "--alpha", "8", "--lr", "1e-5",
            "--target-modules", "q_proj", "--max-steps", "5", "--no-fast", "--metrics-mode", "teacher-forced"]
    text = print_config(argv, capsys)
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    assert print_config(["--config", str(path)], capsys) == text
    assert TrainConfig(**read_config_file(path)) == TrainConfig(**yaml.safe_load(text)) == resolved(argv, capsys)


def test_print_config_loads_nothing(tmp_path, capsys, monkeypatch):
    def no_train(config):
        raise AssertionError("--print-config trained")

    monkeypatch.setattr(recipe, "train", no_train)
    print_config(["--output", str(tmp_path / "run"), "--method", "olora", "--model", "no-such-model"], capsys)
    assert not (tmp_path / "run").exists()


def test_print_config_validates(capsys):
    assert_one_line_error(["train", "--output", "o", "--method", "olora-plus", "--print-config"], capsys,
                          "needs --ratio")


def test_results_json_config_is_the_printed_config(tiny_checkpoint, records_file, tmp_path, capsys):
    out = tmp_path / "run"
    text = print_config(["--model", str(tiny_checkpoint), "--data", str(records_file), "--output", str(out),
                         "--method", "olora-plus", "--ratio", "4", *TINY], capsys)
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["config"] == yaml.safe_load(text)
    assert TrainConfig(**results["config"]) == TrainConfig(**read_config_file(path))


@pytest.mark.parametrize(("name", "content", "needles"), [
    ("run.yaml", "output: o\nmethod: olora\nlearning_rate: 0.1\n", ["'learning_rate' is not a setting"]),
    ("run.json", '{"output": "o", "method": "olora", "bogus": 1}', ["'bogus' is not a setting"]),
    ("run.yaml", "output: o\nmethod: [olora\n", ["is not valid YAML", "at line 3"]),
    ("run.yaml", "output: o\n  method: olora\n", ["is not valid YAML"]),
    ("run.json", '{"output": "o",}', ["is not valid JSON", "line 1"]),
    ("run.yaml", "- output\n- o\n", ["must be a mapping", "not a list"]),
    ("run.json", '"just text"', ["must be a mapping"]),
    ("run.yaml", "", ["is empty"]),
    ("run.yaml", "output: o\nmethod: olora\nrank: four\n", ["rank must be an integer, got 'four'"]),
    ("run.yaml", "output: o\nmethod: olora\nrank: 4.5\n", ["rank must be an integer, got 4.5"]),
    ("run.yaml", "output: o\nmethod: olora\ncompile: maybe\n", ["compile must be true or false"]),
    ("run.yaml", "output: o\nmethod: olora\ndata_seed: [1, 2]\n", ["data-seed must be an integer"]),
    ("run.yaml", "output: o\nmethod: dora\n", ["unknown method 'dora'"]),
    ("run.yaml", "output: o\nmethod: olora\nattention: flash\n", ["unknown attention 'flash'"]),
    ("run.toml", "output = 'o'\n", ["must end in .yaml, .yml, .json"]),
])
def test_bad_config_file_is_one_error_line(name, content, needles, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(content)
    line = assert_one_line_error(["train", "--config", str(path)], capsys, *needles)
    if "setting" in needles[0] or "valid" in needles[0] or "mapping" in needles[0]:
        assert str(path) in line
    assert not (tmp_path / "o").exists()


def test_missing_config_file_and_prefix_flag(tmp_path, capsys):
    assert_one_line_error(["train", "--config", str(tmp_path / "nope.yaml")], capsys, "config file not found",
                          "nope.yaml")
    path = tmp_path / "run.yaml"
    path.write_text("output: o\nmethod: olora\n")
    assert resolved(["--conf", str(path)], capsys).output == "o"  # argparse's prefix of --config


def test_validation_is_the_same_for_flags_files_and_library(tmp_path, capsys):
    with pytest.raises(UserError, match="rank must be a positive finite number, got 0"):
        TrainConfig(output="o", method="olora", rank=0).validate()
    assert_one_line_error(["train", "--output", "o", "--method", "olora", "--rank", "0", "--print-config"], capsys,
                          "rank must be a positive finite number, got 0")
    path = tmp_path / "run.yaml"
    path.write_text("output: o\nmethod: olora\nrank: 0\n")
    assert_one_line_error(["train", "--config", str(path)], capsys, "rank must be a positive finite number, got 0")
    with pytest.raises(UserError, match="lr must be a number"):
        TrainConfig(output="o", method="olora", lr="fast").validate()


# ------------------------------------------------------------------ evaluate and the grids


def test_evaluate_reads_a_train_config(tmp_path, capsys, monkeypatch):
    seen = []

    def fake_evaluate(config, adapter):
        seen.append((config, adapter))
        return {"metrics": dict.fromkeys(("eval_loss", "perplexity", "bleu", "rouge1", "rouge2", "rougeL"), 1.0),
                "evaluation": {"metrics_mode": config.metrics_mode}}

    monkeypatch.setattr(recipe, "evaluate_adapter", fake_evaluate)
    path = tmp_path / "run.yaml"
    path.write_text(print_config(["--output", "trained", "--method", "olora-plus", "--ratio", "4", "--n-eval", "9",
                                  "--rank", "4"], capsys))
    assert main(["evaluate", "--config", str(path), "--adapter", "trained/adapter", "--output", "again"]) == 0
    config, adapter = seen[0]
    assert (config.output, config.n_eval, adapter) == ("again", 9, "trained/adapter")
    assert config.rank == TrainConfig.rank  # a training setting of the file is not evaluate's
    path.write_text("output: o\nbogus: 1\n")
    assert_one_line_error(["evaluate", "--config", str(path), "--adapter", "a"], capsys, "'bogus'", str(path))


@pytest.fixture
def grid_specs(monkeypatch):
    """Runs nothing: the RunSpecs a grid command would run."""
    captured = []

    def fake_run_and_report(specs, output, reuse=()):
        captured.extend(specs)
        return grid.GridOutcome()

    monkeypatch.setattr(grid, "run_and_report", fake_run_and_report)
    hf_logging.enable_progress_bar()
    yield captured
    hf_logging.enable_progress_bar()


def test_sweep_passes_only_given_flags_and_file_flags(grid_specs, tmp_path, capsys):
    path = tmp_path / "flags.yaml"
    path.write_text("n_train: 8\nrank: 4\nlr: 1e-3\n")
    argv = ["sweep", "--models", "m", "--seeds", "1", "--ratios", "4", "--output", str(tmp_path / "g"),
            "--config", str(path), "--rank", "2", "--no-fast"]
    assert main(argv) == 0
    assert grid_specs and all(s.flags == {"n_train": 8, "rank": 2, "lr": 1e-3, "fast": False} for s in grid_specs)
    assert hf_logging.is_progress_bar_enabled()
    grid_specs.clear()
    assert main(["sweep", "--models", "m", "--seeds", "1", "--output", str(tmp_path / "g"), "--no-progress"]) == 0
    assert grid_specs[0].flags == {"progress": False}
    assert not hf_logging.is_progress_bar_enabled()  # transformers' loading bars are off too


def test_reproduce_preset_then_file_then_flags(grid_specs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "flags.json"
    path.write_text(json.dumps({"n_train": 50, "n_eval": 20}))
    assert main(["reproduce", "--preset", "quick", "--seeds", "1", "--config", str(path), "--n-eval", "10"]) == 0
    flags = grid_specs[0].flags
    assert (flags["n_train"], flags["n_eval"]) == (50, 10)
    assert flags["max_new_tokens"] == PRESETS["quick"].flags["max_new_tokens"]  # absent: the preset's value


def test_grid_config_file_cannot_set_what_the_grid_sets(grid_specs, tmp_path, capsys):
    path = tmp_path / "flags.yaml"
    path.write_text("method: olora\n")
    assert_one_line_error(["sweep", "--models", "m", "--output", str(tmp_path / "g"), "--config", str(path)], capsys,
                          "'method' does not apply to this command", str(path))
    assert grid_specs == []


def test_grid_flags_are_parsed_and_validated_like_train_flags(tmp_path, capsys):
    out = tmp_path / "g"
    assert_one_line_error(["sweep", "--models", "m", "--seeds", "1", "--output", str(out), "--rank", "x"], capsys,
                          "argument --rank: invalid int value: 'x'")
    assert_one_line_error(["sweep", "--models", "m", "--seeds", "1", "--output", str(out), "--rank", "0",
                           "--no-progress"], capsys, "rank must be a positive finite number, got 0")
    hf_logging.enable_progress_bar()
    assert not out.exists()


def test_build_parser_applies_file_settings():
    parser = build_parser({"train": {"output": "o", "method": "olora", "rank": 4}})
    args = parser.parse_args(["train", "--rank", "6"])
    assert (args.output, args.method, args.rank) == ("o", "olora", 6)
    assert asdict(TrainConfig(output="o", method="olora"))["rank"] == 32
