"""Every user error: exit code 2, one ``error: ...`` line on stderr, no traceback, no result.

One row per entry of docs/errors.md. The rows marked ``early`` must fail before any model is
loaded (``load_model`` is replaced by a function that fails the test if it is called).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_records

import oloraplus.models.loading
import oloraplus.training.recipe
from oloraplus.cli import main

SMALL = {"--n-train": "8", "--n-eval": "4", "--max-new-tokens": "4", "--precision": "fp32", "--no-progress": True,
         "--max-steps": "1", "--rank": "4"}


@pytest.fixture(scope="module")
def checkpoint(module_checkpoint) -> Path:
    return module_checkpoint


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


GOOD = make_records(40)
# (id, data file content or None for the good fixture records, flags, expected text, early).
# The flags replace those of a valid command (see _argv); {tmp} is the test's folder.
CASES = [
    # --- data files
    ("data-missing", None, ["--data", "{tmp}/nope.json"], "data file not found", True),
    ("data-empty", "", [], "file is empty", True),
    ("data-blank", " \n\n", [], "file is empty", True),
    ("data-truncated", json.dumps(GOOD)[:500], [], "not valid JSON", True),
    ("data-not-utf8", b'[{"instruction": "caf\xe9", "input": "", "output": "x"}]', [], "not UTF-8", True),
    ("data-not-a-list", {"instruction": "a", "input": "", "output": "b"}, [], "expected a JSON list", True),
    ("data-record-not-object", ["just a string"] * 40, [], "record 0 is a str, not an object", True),
    ("data-jsonl-bad-line", None, ["--data", "{tmp}/bad.jsonl"], "line 2 is not valid JSON", True),
    ("data-missing-field", [{"instruction": "a", "input": ""}] * 40, [], "record 0 has no 'output' field", True),
    ("data-null-field", [{"instruction": None, "input": "", "output": "b"}] * 40, [], "no 'instruction' field",
     True),
    ("data-non-string-field", [{"instruction": "a", "input": "", "output": 3}] * 40, [],
     "field 'output' is a int, not a string", True),
    ("data-too-few-records", GOOD[:10], [], "has 10 records, fewer than --n-train 8 + --n-eval 4", True),
    # --- numbers
    *[(f"ratio-{v}", None, ["--ratio", v], "ratio must be a positive finite number", True)
      for v in ("0", "-1", "nan", "inf")],
    *[(f"alpha-{v}", None, ["--alpha", v], "alpha must be a positive finite number", True)
      for v in ("0", "-2", "nan", "inf")],
    *[(f"lr-{v}", None, ["--lr", v], "lr must be a positive finite number", True)
      for v in ("0", "-0.0001", "nan", "inf")],
    *[(f"epochs-{v}", None, ["--epochs", v], "epochs must be a positive finite number", True)
      for v in ("0", "-1", "nan", "inf")],
    *[(f"rank-{v}", None, ["--rank", v], f"rank must be a positive finite number, got {v}", True)
      for v in ("0", "-4")],
    *[(f"batch-size-{v}", None, ["--batch-size", v], f"batch-size must be a positive finite number, got {v}", True)
      for v in ("0", "-8")],
    ("rank-nan", None, ["--rank", "nan"], "argument --rank: invalid int value: 'nan'", True),
    ("batch-size-inf", None, ["--batch-size", "inf"], "argument --batch-size: invalid int value: 'inf'", True),
    ("ratio-not-a-number", None, ["--ratio", "abc"], "argument --ratio: invalid float value: 'abc'", True),
    ("n-eval-0", None, ["--n-eval", "0"], "n-eval must be a positive finite number, got 0", True),
    ("save-steps-0", None, ["--save-steps", "0"], "save-steps must be a positive finite number, got 0", True),
    ("max-steps-0", None, ["--max-steps", "0"], "max-steps must be a positive finite number, got 0", True),
    ("dropout-1", None, ["--dropout", "1"], "dropout must be in [0, 1), got 1.0", True),
    ("weight-decay-nan", None, ["--weight-decay", "nan"], "weight_decay must be >= 0 and finite, got nan", True),
    ("grad-accum-0", None, ["--grad-accum", "0"], "grad-accum must be a positive finite number, got 0", True),
    ("warmup-ratio-1", None, ["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1)", True),
    ("lr-scheduler-unknown", None, ["--lr-scheduler", "poly"], "argument --lr-scheduler: invalid choice", True),
    ("checkpointing-and-compile", None, ["--gradient-checkpointing", "--compile"], "does not combine", True),
    ("report-to-unknown", None, ["--report-to", "comet"], "argument --report-to: invalid choice", True),
    ("rank-too-large", None, ["--rank", "40"], "rank 40 is larger than target layer", False),
    # --- method
    ("method-unknown", None, ["--method", "dora"], "argument --method: invalid choice: 'dora'", True),
    ("method-missing", None, ["--method", None], "the following arguments are required: --method", True),
    ("plus-without-ratio", None, ["--method", "olora-plus", "--ratio", None], "needs --ratio", True),
    ("ratio-without-plus", None, ["--method", "olora", "--ratio", "4"], "use --method olora-plus", True),
    # --- model
    ("model-unknown-name", None, ["--model", "no-such-model"], "unknown model 'no-such-model'", False),
    ("model-folder-without-config", None, ["--model", "{tmp}/empty-model"], "has no config.json", False),
    ("model-hub-id-offline", None, ["--model", "nobody/does-not-exist"], "cannot load 'nobody/does-not-exist'",
     False),
    # --- output and resume
    ("output-is-a-file", None, ["--output", "{tmp}/a-file"], "is an existing file", True),
    ("output-not-empty", None, ["--output", "{tmp}/full"], "is not empty; pass --overwrite", True),
    ("resume-and-overwrite", None, ["--resume", "--overwrite"], "pass only one", True),
    ("resume-without-checkpoint", None, ["--resume", "--output", "{tmp}/full"], "no complete checkpoint", True),
    ("resume-complete-run", None, ["--resume", "--output", "{tmp}/done"], "already complete", True),
    ("batch-not-divisible-by-processes", None, ["--batch-size", "3", "ENV:WORLD_SIZE=2"],
     "must divide evenly across 2 processes", True),
    # --- command line
    ("command-unknown", None, ["CMD:fly"], "argument command: invalid choice: 'fly'", True),
    ("flag-unknown", None, ["--learning-rate", "1"], "unrecognized arguments: --learning-rate 1", True),
    ("export-not-an-adapter", None, ["CMD:export", "--adapter", "{tmp}", "--to", "lora"],
     "is not a PEFT adapter folder", True),
    ("export-unknown-target", None, ["CMD:export", "--adapter", "{tmp}", "--to", "gguf"],
     "argument --to: invalid choice: 'gguf'", True),
    ("export-output-is-the-adapter", None, ["CMD:export", "--adapter", "{tmp}/adapter", "--to", "lora",
                                            "--output", "{tmp}/adapter", "--overwrite"],
     "would overwrite the input", True),
]


def _argv(flags: list, tmp: Path, ckpt: Path, out: Path, data: Path) -> tuple[list[str], dict]:
    """The row's flags on top of a valid command; "CMD:x" picks the command, "ENV:K=V" sets a variable,
    a flag followed by None is left out, a flag followed by another flag is a switch."""
    command, env, given = "train", {}, {}
    i = 0
    while i < len(flags):
        flag = flags[i]
        if flag.startswith("CMD:"):
            command = flag[4:]
        elif flag.startswith("ENV:"):
            key, value = flag[4:].split("=")
            env[key] = value
        elif i + 1 < len(flags) and (flags[i + 1] is None or not flags[i + 1].startswith(("--", "CMD:", "ENV:"))):
            given[flag] = flags[i + 1]
            i += 1
        else:
            given[flag] = True
        i += 1
    base: dict = {"--model": str(ckpt), "--output": str(out)}
    if command == "train":
        base.update(SMALL, **{"--data": str(data), "--method": "olora-plus", "--ratio": "4"})
    elif command != "export":
        base = {}
    argv = [command]
    for flag, value in {**base, **given}.items():
        if value is not None:
            argv += [flag] if value is True else [flag, str(value).format(tmp=tmp)]
    return argv, env


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """The files the rows point at."""
    _write(tmp_path / "bad.jsonl", json.dumps(GOOD[0]) + "\n{not json\n")
    (tmp_path / "empty-model").mkdir()
    _write(tmp_path / "a-file", "not a folder")
    (tmp_path / "full").mkdir()
    _write(tmp_path / "full" / "keep.txt", "earlier work")
    (tmp_path / "done").mkdir()
    _write(tmp_path / "done" / "results.json", {"metrics": {}})
    (tmp_path / "adapter").mkdir()
    _write(tmp_path / "adapter" / "adapter_config.json", {"peft_type": "LORA"})
    return tmp_path


@pytest.mark.parametrize(("data", "flags", "needle", "early"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_user_error(data, flags, needle, early, workspace, checkpoint, monkeypatch, capsys):
    data_file = _write(workspace / "data.json", GOOD if data is None else data)
    out = workspace / "run"
    argv, env = _argv(flags, workspace, checkpoint, out, data_file)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if early:
        def no_model(*args, **kwargs):
            raise AssertionError("a model was loaded before this error was found")

        monkeypatch.setattr(oloraplus.training.recipe, "load_model", no_model)
        monkeypatch.setattr(oloraplus.models.loading, "load_model", no_model)  # export imports it when called
    before = {p: p.stat().st_mtime_ns for p in workspace.rglob("*")}

    code = main(argv)

    captured = capsys.readouterr()
    assert code == 2, (argv, captured)
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    for folder in (out, workspace / "full", workspace / "a-file"):
        assert not (folder / "results.json").exists()
    changed = [p for p, t in before.items() if not p.exists() or p.stat().st_mtime_ns != t]
    assert changed == [], "existing files were modified or removed"
    if early:
        assert not out.exists() or not any(out.iterdir())


def test_help_still_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--save-steps" in capsys.readouterr().out
