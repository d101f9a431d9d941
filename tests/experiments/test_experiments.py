"""The experiment grid: expansion, presets, and resumable, failure-tolerant running.

Most tests replace ``oloraplus.experiments.grid.train`` with a fake that behaves like the real one
where it matters (refuses/clears a non-empty folder via ``prepare_output``, writes
``results.json`` last) so the grid logic is tested in milliseconds; one test runs the real
``oloraplus sweep`` + ``oloraplus report`` on the tiny checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

import oloraplus.experiments.grid as experiments
from oloraplus.cli import main
from oloraplus.errors import UserError
from oloraplus.experiments.grid import PRESETS, expand_grid, format_ratio, parse_ratio, preset_grid, run_grid, safe_name
from oloraplus.files import write_json_atomic
from oloraplus.training.checkpoints import finish_output, prepare_output


def fake_metrics(config) -> dict:
    lam = 1.0 if config.ratio is None else config.ratio
    return {"eval_loss": 1.0 + lam / 100 + config.seed / 1000, "perplexity": 3.0, "bleu": 10.0 + config.seed,
            "rouge1": 30.0 + lam, "rouge2": 12.0, "rougeL": 25.0}


class FakeTrain:
    """Stands in for ``oloraplus.training.recipe.train``: same folder handling, instant "training"."""

    def __init__(self, fail_on: set[str] = frozenset(), interrupt_on: set[str] = frozenset()):
        self.calls: list[str] = []
        self.fail_on, self.interrupt_on = fail_on, interrupt_on

    def __call__(self, config):
        out = prepare_output(config.output, config.overwrite)
        name = Path(config.output).name
        self.calls.append(name)
        (out / "adapter").mkdir()
        (out / "adapter" / "partial.bin").write_bytes(b"x")  # written before results.json, as in train()
        if name in self.fail_on:
            raise RuntimeError(f"CUDA out of memory in {name}")
        if name in self.interrupt_on:
            raise KeyboardInterrupt
        results = {"metrics": fake_metrics(config), "evaluation": {"metrics_mode": config.metrics_mode},
                   "config": asdict(config), "timings_seconds": {"train": 0.5, "total": 1.0}}
        write_json_atomic(out / "results.json", results)
        finish_output(config.output)  # a replaced (--overwrite) run is swapped in only now, as in train()
        return results


@pytest.fixture(autouse=True)
def no_data_check(monkeypatch):
    """The fake runs read no data and load no model: skip the grid's up-front data-file and model-name
    checks (tested on their own)."""
    monkeypatch.setattr(experiments, "local_data_file", lambda data: None)
    monkeypatch.setattr(experiments, "resolve_model", lambda name: name)  # the fake runs load no model


@pytest.fixture
def fake(monkeypatch) -> FakeTrain:
    f = FakeTrain()
    monkeypatch.setattr(experiments, "train", f)
    return f


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


SPECS_ARGS = dict(models=["tiny"], ratios=[1 / 16, 16], seeds=2, n_train=8, n_eval=4)


# ----------------------------------------------------------------------------- expansion


def test_parse_ratio_accepts_fractions_and_decimals():
    assert parse_ratio("1/16") == 0.0625 == parse_ratio("0.0625")
    assert parse_ratio("16") == 16.0 and parse_ratio(4) == 4.0
    for bad in ("abc", "0", "-2", "1/0", "inf"):
        with pytest.raises(UserError):
            parse_ratio(bad)


def test_format_ratio_and_safe_names():
    assert format_ratio(1 / 16) == "0.0625" and format_ratio(16.0) == "16" and format_ratio(1) == "1"
    assert float(format_ratio(1 / 3)) == 1 / 3  # exact round trip, no collisions by rounding
    assert safe_name("TinyLlama/TinyLlama_v1.1") == "TinyLlama--TinyLlama_v1.1"
    assert "/" not in safe_name("/tmp/x y/model") and " " not in safe_name("/tmp/x y/model")


def test_expand_grid_counts_keys_and_single_baseline():
    specs = expand_grid(["smollm2-135m", "org/model"], ratios=[1 / 16, 1, 16], seeds=3, n_train=10)
    # per model and seed: one baseline + two OLoRA+ arms; the ratio 1 in --ratios is the baseline
    assert len(specs) == 2 * 3 * 3
    keys = [s.key for s in specs]
    assert len(set(keys)) == len(keys)
    baselines = [s for s in specs if s.method == "olora"]
    assert len(baselines) == 2 * 3 and all(s.ratio == 1.0 for s in baselines)
    assert {s.ratio for s in specs if s.method == "olora-plus"} == {0.0625, 16.0}
    assert "smollm2-135m/olora-r1-s0" in keys
    assert "smollm2-135m/olora-plus-r0.0625-s1" in keys
    assert "org/model/olora-plus-r16-s2" in keys
    folders = {s.folder for s in specs}
    assert "org--model/olora-plus-r16-s2" in folders and len(folders) == len(specs)
    assert all(s.flags == {"n_train": 10} for s in specs)
    # stable: the same arguments give the same keys in the same order
    assert [s.key for s in expand_grid(["smollm2-135m", "org/model"], ratios=[16, 1, 1 / 16], seeds=3,
                                       n_train=10)] == keys
    # seed-major within a model: the first three runs are the complete comparison of seed 0
    assert [(s.method, s.ratio, s.seed) for s in specs[:3]] == [
        ("olora", 1.0, 0), ("olora-plus", 0.0625, 0), ("olora-plus", 16.0, 0)]


def test_expand_grid_without_ratio_one_still_has_baseline_and_configs_validate(tmp_path):
    specs = expand_grid(["m"], ratios=["1/4", "4"], seeds=[5])
    assert [(s.method, s.ratio, s.seed) for s in specs] == [("olora", 1.0, 5), ("olora-plus", 0.25, 5),
                                                            ("olora-plus", 4.0, 5)]
    configs = [s.config(tmp_path / s.folder) for s in specs]
    for c in configs:
        c.validate()
    assert configs[0].ratio is None and configs[1].ratio == 0.25 and configs[1].lam == 0.25


def test_expand_grid_rejects_bad_input():
    with pytest.raises(UserError, match="unknown train flag"):
        expand_grid(["m"], n_trian=5)
    with pytest.raises(UserError, match="unknown method"):
        expand_grid(["m"], methods=["dora"])
    with pytest.raises(UserError, match="seeds"):
        expand_grid(["m"], seeds=0)
    with pytest.raises(UserError, match="models"):
        expand_grid([])


def test_presets():
    quick = preset_grid("quick").expand()
    assert len(quick) == 1 * 3 * 2 and {s.model for s in quick} == {"smollm2-135m"}  # 3 arms x 2 seeds
    assert quick[0].flags == {"rank": 32, "alpha": 16, "lr": 3e-4, "epochs": 1, "n_train": 200, "n_eval": 100,
                              "max_new_tokens": 32}
    local = preset_grid("local").expand()
    assert len(local) == 2 * 3 * 3  # 2 models x 3 arms x 3 seeds
    assert {s.model for s in local} == {"smollm2-135m", "gemma3-270m"} and local[0].flags["n_train"] == 1000
    assert PRESETS["paper"].models == ("tinyllama-1.1b", "opt-1.3b", "gemma-2b")
    paper = preset_grid("paper", seeds=1, ratios=[0.25], max_steps=3).expand()
    assert len(paper) == 3 * 2 and all(s.flags["max_steps"] == 3 and s.flags["n_eval"] == 500 for s in paper)
    with pytest.raises(UserError):
        preset_grid("huge")


# ----------------------------------------------------------------------------- running


def test_run_grid_runs_each_spec_once_and_skips_completed(tmp_path, fake):
    specs = expand_grid(**SPECS_ARGS)
    outcome = run_grid(specs, tmp_path, log=lambda s: None)
    assert outcome.ok and len(outcome.done) == len(specs) == 6 and len(fake.calls) == 6
    rows = read_lines(tmp_path / "runs.jsonl")
    assert [r["key"] for r in rows] == [s.key for s in specs]
    row = rows[1]
    spec = specs[1]
    assert (row["model"], row["method"], row["ratio"], row["seed"]) == (spec.model, spec.method, spec.ratio, spec.seed)
    assert row["run_dir"] == f"runs/{spec.folder}" and (tmp_path / row["run_dir"] / "results.json").is_file()
    stored = json.loads((tmp_path / row["run_dir"] / "results.json").read_text())
    assert row["metrics"] == stored["metrics"] and row["metrics_mode"] == "generation"
    assert row["flags"] == {"n_train": 8, "n_eval": 4}
    assert row["timings"]["train"] == 0.5 and row["timings"]["wall"] >= 0

    again = run_grid(specs, tmp_path, log=lambda s: None)
    assert len(fake.calls) == 6 and again.skipped == [s.key for s in specs] and not again.done
    assert read_lines(tmp_path / "runs.jsonl") == rows  # no duplicates


def test_a_run_claimed_by_another_process_is_passed_over_and_one_finished_meanwhile_is_not_redone(tmp_path,
                                                                                                  monkeypatch):
    from oloraplus.outputs import shared_work_claim

    specs = expand_grid(**SPECS_ARGS)
    busy, finished_elsewhere = specs[1], specs[2]
    other = FakeTrain()

    class Neighbour(FakeTrain):  # while this process trains the first run, "another" finishes specs[2]
        def __call__(self, config):
            if not self.calls:  # the other process trains it and records its row, with its timing
                results = other(finished_elsewhere.config(tmp_path / "runs" / finished_elsewhere.folder))
                experiments._record(tmp_path / "runs.jsonl", experiments.run_row(
                    finished_elsewhere, results, f"runs/{finished_elsewhere.folder}", 12.5), set())
            return super().__call__(config)

    fake = Neighbour()
    monkeypatch.setattr(experiments, "train", fake)
    with shared_work_claim(experiments.claim_path(tmp_path, f"runs/{busy.folder}")) as mine:
        assert mine
        outcome = run_grid(specs, tmp_path, log=lambda s: None)
    assert outcome.ok and outcome.elsewhere == [busy.key]
    assert outcome.skipped == [finished_elsewhere.key]  # recorded from the other process's results, not redone
    assert sorted(fake.calls) == sorted(Path(s.folder).name for s in specs if s not in (busy, finished_elsewhere))
    keys = [r["key"] for r in read_lines(tmp_path / "runs.jsonl")]
    assert sorted(keys) == sorted(s.key for s in specs if s is not busy)
    row = next(r for r in read_lines(tmp_path / "runs.jsonl") if r["key"] == finished_elsewhere.key)
    assert row["timings"]["wall"] == 12.5  # the other process's row is kept, not replaced by a timeless one
    timed = {r["key"]: r["timings"].get("wall") for r in read_lines(tmp_path / "runs.jsonl")}
    again = run_grid(specs, tmp_path, log=lambda s: None)  # the claim is released: now it runs
    assert all(r["timings"].get("wall") == timed[r["key"]] for r in read_lines(tmp_path / "runs.jsonl")
               if r["key"] in timed)  # a finished run's row, with its timing, is kept as it was
    assert again.done == [busy.key] and not again.elsewhere
    assert sorted(r["key"] for r in read_lines(tmp_path / "runs.jsonl")) == sorted(s.key for s in specs)


def test_a_claim_is_held_for_its_block_and_free_after_it(tmp_path):
    from oloraplus.outputs import shared_work_claim

    path = tmp_path / "claims" / "x.lock"
    with shared_work_claim(path) as first, shared_work_claim(path) as second:  # a second open file: as another process
        assert first and not second
    with shared_work_claim(path) as again:
        assert again


_GRID_WORKER = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import test_experiments as t
import oloraplus.experiments.grid as grid
grid.local_data_file = lambda data: None
grid.resolve_model = lambda name: name
fake = t.FakeTrain()
def slow(config):
    with open(sys.argv[2], "a") as f:
        f.write(Path(config.output).name + "\\n")
    time.sleep(1.0)
    return fake(config)
grid.train = slow
outcome = grid.run_grid(grid.expand_grid(**t.SPECS_ARGS), sys.argv[1], log=lambda s: None)
print(json.dumps({"done": len(outcome.done), "elsewhere": len(outcome.elsewhere), "failed": len(outcome.failed)}))
"""


@pytest.mark.slow
def test_two_processes_share_one_grid_and_run_each_run_once(tmp_path):
    import subprocess
    import sys

    calls = tmp_path / "calls.txt"
    cmd = [sys.executable, "-c", _GRID_WORKER, str(tmp_path / "grid"), str(calls), str(Path(__file__).parent)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    specs = expand_grid(**SPECS_ARGS)
    names = calls.read_text().split()
    assert sorted(names) == sorted(Path(s.folder).name for s in specs)  # each run trained once, by one process
    assert sum(r["done"] for r in results) == len(specs) and not any(r["failed"] for r in results)
    assert all(r["done"] for r in results)  # both worked: started together, 6 runs of 1 s
    rows = read_lines(tmp_path / "grid" / "runs.jsonl")
    assert sorted(r["key"] for r in rows) == sorted(s.key for s in specs)  # one row each, none lost


def test_incomplete_folder_is_redone(tmp_path, fake):
    specs = expand_grid(**SPECS_ARGS)
    leftover = tmp_path / "runs" / specs[2].folder
    (leftover / "checkpoints").mkdir(parents=True)
    (leftover / "checkpoints" / "junk").write_text("from a killed run")
    run_grid(specs, tmp_path, log=lambda s: None)
    assert len(fake.calls) == 6
    assert not (leftover / "checkpoints").exists() and (leftover / "results.json").is_file()


def test_interrupted_run_leaves_valid_runs_file_and_is_redone(tmp_path, monkeypatch):
    specs = expand_grid(**SPECS_ARGS)
    victim = specs[3]
    crashing = FakeTrain(interrupt_on={Path(victim.folder).name})
    monkeypatch.setattr(experiments, "train", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_grid(specs, tmp_path, log=lambda s: None)
    rows = read_lines(tmp_path / "runs.jsonl")  # parseable, only the finished runs
    assert [r["key"] for r in rows] == [s.key for s in specs[:3]]
    assert not (tmp_path / "runs" / victim.folder / "results.json").exists()

    healthy = FakeTrain()
    monkeypatch.setattr(experiments, "train", healthy)
    outcome = run_grid(specs, tmp_path, log=lambda s: None)
    assert healthy.calls == [Path(s.folder).name for s in specs[3:]]
    assert outcome.skipped == [s.key for s in specs[:3]]
    keys = [r["key"] for r in read_lines(tmp_path / "runs.jsonl")]
    assert sorted(keys) == sorted(s.key for s in specs) and len(keys) == len(set(keys))


def test_crash_while_appending_keeps_runs_file_and_recovers_the_line(tmp_path, fake, monkeypatch):
    specs = expand_grid(**SPECS_ARGS)
    run_grid(specs[:2], tmp_path, log=lambda s: None)
    before = (tmp_path / "runs.jsonl").read_bytes()

    import oloraplus.files as files

    real_replace = files.os.replace

    def dying_replace(src, dst):  # the process dies after writing the temp file, before the rename
        if str(dst).endswith("runs.jsonl"):
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", dying_replace)
    with pytest.raises(OSError):
        run_grid(specs[:3], tmp_path, log=lambda s: None)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert (tmp_path / "runs.jsonl").read_bytes() == before  # old content intact, never half written
    assert not list(tmp_path.glob(".runs.jsonl*"))  # no temp file left behind
    assert (tmp_path / "runs" / specs[2].folder / "results.json").is_file()

    calls = len(fake.calls)
    run_grid(specs[:3], tmp_path, log=lambda s: None)
    assert len(fake.calls) == calls  # the finished run is not redone, only its line added
    assert [r["key"] for r in read_lines(tmp_path / "runs.jsonl")] == [s.key for s in specs[:3]]


def test_failed_run_is_recorded_and_grid_continues(tmp_path, monkeypatch):
    specs = expand_grid(**SPECS_ARGS)
    victim = specs[1]
    failing = FakeTrain(fail_on={Path(victim.folder).name})
    monkeypatch.setattr(experiments, "train", failing)
    logs: list[str] = []
    outcome = run_grid(specs, tmp_path, log=logs.append)
    assert outcome.failed == [victim.key] and not outcome.ok
    assert len(outcome.done) == len(specs) - 1 and len(failing.calls) == len(specs)
    assert victim.key not in {r["key"] for r in read_lines(tmp_path / "runs.jsonl")}
    failures = read_lines(tmp_path / "failures.jsonl")
    assert failures[0]["key"] == victim.key and "CUDA out of memory" in failures[0]["error"]
    assert "RuntimeError" in failures[0]["traceback"]
    assert any("FAILED" in line and victim.label in line for line in logs)
    done_line = next(line for line in logs if specs[0].label in line and "done" in line)
    assert done_line.startswith(f"[1/{len(specs)}] tiny olora r=1 seed 0 ... done (eval_loss 1.0100, ")


def test_result_line_added_when_results_exist_but_line_missing(tmp_path, fake):
    specs = expand_grid(**SPECS_ARGS)
    run_grid(specs, tmp_path, log=lambda s: None)
    rows = read_lines(tmp_path / "runs.jsonl")
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-2]))
    run_grid(specs, tmp_path, log=lambda s: None)
    assert len(fake.calls) == len(specs)
    assert sorted(r["key"] for r in read_lines(tmp_path / "runs.jsonl")) == sorted(s.key for s in specs)


def test_deleted_run_folder_is_redone_without_duplicating_its_key(tmp_path, fake):
    import shutil

    specs = expand_grid(**SPECS_ARGS)
    run_grid(specs, tmp_path, log=lambda s: None)
    shutil.rmtree(tmp_path / "runs" / specs[0].folder)
    run_grid(specs, tmp_path, log=lambda s: None)
    assert len(fake.calls) == len(specs) + 1
    keys = [r["key"] for r in read_lines(tmp_path / "runs.jsonl")]
    assert sorted(keys) == sorted(s.key for s in specs)


def test_resume_with_other_settings_is_refused(tmp_path, fake):
    run_grid(expand_grid(**SPECS_ARGS), tmp_path, log=lambda s: None)
    changed = expand_grid(**{**SPECS_ARGS, "n_train": 16})
    with pytest.raises(UserError, match="n_train"):
        run_grid(changed, tmp_path, log=lambda s: None)
    assert len(fake.calls) == 6
    # speed-only flags may change on resume
    run_grid(expand_grid(**SPECS_ARGS, eval_batch_size=2, progress=False), tmp_path, log=lambda s: None)
    assert len(fake.calls) == 6


def test_invalid_config_fails_before_any_run(tmp_path, fake):
    with pytest.raises(UserError, match="n-train"):
        run_grid(expand_grid(["m"], n_train=0), tmp_path, log=lambda s: None)
    assert fake.calls == []


def test_missing_data_file_fails_the_grid_once_before_any_run(tmp_path, fake, monkeypatch, capsys):
    monkeypatch.undo()  # the real data check
    monkeypatch.setattr(experiments, "train", fake)
    specs = expand_grid(**SPECS_ARGS, data=str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="data file not found"):
        run_grid(specs, tmp_path / "grid", log=lambda s: None)
    assert fake.calls == [] and not (tmp_path / "grid").exists()
    argv = ["sweep", "--models", "tiny", "--seeds", "1", "--data", str(tmp_path / "nope.json"), "--output", str(tmp_path / "g")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data file not found")


def test_cli_sweep_parses_ratios_and_exits_nonzero_on_failure(tmp_path, monkeypatch, capsys):
    failing = FakeTrain(fail_on={"olora-plus-r16-s0"})
    monkeypatch.setattr(experiments, "train", failing)
    out = tmp_path / "grid"
    code = main(["sweep", "--models", "m", "--ratios", "1/16", "16", "--seeds", "1", "--n-train", "8",
                 "--metrics-mode", "teacher-forced", "--no-progress", "--output", str(out)])
    assert code == 1
    assert sorted(failing.calls) == ["olora-plus-r0.0625-s0", "olora-plus-r16-s0", "olora-r1-s0"]
    rows = read_lines(out / "runs.jsonl")
    assert {r["ratio"] for r in rows} == {1.0, 0.0625}
    assert rows[0]["flags"] == {"n_train": 8, "metrics_mode": "teacher-forced", "progress": False}
    assert rows[0]["metrics_mode"] == "teacher-forced"
    assert (out / "report.md").is_file()  # finished runs are reported even when one failed
    assert "1 failed" in capsys.readouterr().out


def test_cli_reproduce_uses_preset_and_overrides(tmp_path, fake, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["reproduce", "--preset", "quick", "--seeds", "1", "--ratios", "0.25", "--max-steps", "2"])
    assert code == 0
    rows = read_lines(tmp_path / "runs" / "quick" / "runs.jsonl")
    assert [(r["method"], r["ratio"]) for r in rows] == [("olora", 1.0), ("olora-plus", 0.25)]
    assert rows[0]["flags"]["n_train"] == 200 and rows[0]["flags"]["max_steps"] == 2
    assert (tmp_path / "runs" / "quick" / "report.md").is_file()


def test_cli_bad_ratio_is_a_user_error(tmp_path, fake, capsys):
    assert main(["sweep", "--models", "m", "--ratios", "x", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ratio 'x'")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_sweep_and_report_end_to_end_on_tiny_checkpoint(tmp_path, tiny_checkpoint, records_file):
    out = tmp_path / "grid"
    args = ["sweep", "--models", str(tiny_checkpoint), "--ratios", "1", "16", "--seeds", "1",
            "--data", str(records_file), "--n-train", "8", "--n-eval", "4", "--max-steps", "1", "--batch-size", "4",
            "--rank", "4", "--max-length", "96", "--max-new-tokens", "4", "--metrics-mode", "teacher-forced",
            "--precision", "fp32", "--no-progress", "--output", str(out)]
    assert main(args) == 0
    rows = read_lines(out / "runs.jsonl")
    assert [(r["method"], r["ratio"]) for r in rows] == [("olora", 1.0), ("olora-plus", 16.0)]
    for r in rows:
        results = json.loads((out / r["run_dir"] / "results.json").read_text())
        assert r["metrics"] == results["metrics"] and results["method"]["ratio"] == r["ratio"]
        assert results["training"]["steps"] == 1
    assert main(args) == 0  # resumed: nothing to do
    assert len(read_lines(out / "runs.jsonl")) == 2

    assert main(["report", str(out), "--output", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "OLoRA+ λ=16" in md and "teacher-forced" in md
    assert f"{rows[0]['metrics']['eval_loss']:.4f}" in md
    assert (tmp_path / "rep" / "figure_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reuse_copies_a_finished_run_with_the_same_settings(tmp_path, monkeypatch):
    calls = []

    def fake_train(config):
        calls.append(config.output)
        out = Path(config.output)
        out.mkdir(parents=True, exist_ok=True)
        results = {"metrics": {"eval_loss": 1.0 + config.lam, "perplexity": 1, "bleu": 1, "rouge1": 1,
                               "rouge2": 1, "rougeL": 1}, "config": asdict(config)}
        (out / "results.json").write_text(json.dumps(results))
        return results

    monkeypatch.setattr("oloraplus.experiments.grid.train", fake_train)
    first = expand_grid(["m"], ratios=[16.0], seeds=1, n_train=10)
    run_grid(first, tmp_path / "a", log=lambda _: None)
    assert len(calls) == 2
    second = expand_grid(["m"], ratios=[0.25, 16.0], seeds=1, n_train=10)
    run_grid(second, tmp_path / "b", log=lambda _: None, reuse=[tmp_path / "a"])
    assert len(calls) == 3  # only the new ratio was trained
    rows = {r["key"]: r for r in experiments.read_runs(tmp_path / "b" / "runs.jsonl")}
    assert len(rows) == 3
    assert (tmp_path / "b" / "runs" / second[-1].folder / "results.json").is_file()
    other = expand_grid(["m"], ratios=[16.0], seeds=1, n_train=20)  # other settings: not reused
    run_grid(other, tmp_path / "c", log=lambda _: None, reuse=[tmp_path / "a"])
    assert len(calls) == 5


def test_rescore_scores_saved_adapters_in_another_mode(tmp_path, monkeypatch):
    def fake_train(config):
        out = Path(config.output)
        (out / "adapter").mkdir(parents=True, exist_ok=True)
        results = {"metrics": {"eval_loss": 2.0, "perplexity": 7, "bleu": 1, "rouge1": 1, "rouge2": 1, "rougeL": 1},
                   "evaluation": {"metrics_mode": config.metrics_mode}, "config": asdict(config)}
        (out / "results.json").write_text(json.dumps(results))
        return results

    scored = []

    def fake_evaluate(config, adapter):
        scored.append((config.metrics_mode, config.seed, Path(adapter).is_dir()))
        out = Path(config.output)
        out.mkdir(parents=True, exist_ok=True)
        results = {"metrics": {"eval_loss": 2.0, "perplexity": 7, "bleu": 50, "rouge1": 60, "rouge2": 40,
                               "rougeL": 55}, "evaluation": {"metrics_mode": config.metrics_mode},
                   "config": asdict(config)}
        (out / "results.json").write_text(json.dumps(results))
        return results

    monkeypatch.setattr("oloraplus.experiments.grid.train", fake_train)
    monkeypatch.setattr("oloraplus.training.recipe.evaluate_adapter", fake_evaluate)
    run_grid(expand_grid(["m"], ratios=[16.0], seeds=2, n_train=10), tmp_path / "grid", log=lambda _: None)
    outcome = experiments.rescore_grid(tmp_path / "grid", tmp_path / "tf", "teacher-forced", seeds=[0],
                                       log=lambda _: None)
    assert outcome.ok and sorted(scored) == [("teacher-forced", 0, True)] * 2  # two arms of seed 0
    rows = experiments.read_runs(tmp_path / "tf" / "runs.jsonl")
    assert {r["metrics_mode"] for r in rows} == {"teacher-forced"} and {r["seed"] for r in rows} == {0}
    experiments.rescore_grid(tmp_path / "grid", tmp_path / "tf", "teacher-forced", seeds=[0], log=lambda _: None)
    assert len(scored) == 2 and len(experiments.read_runs(tmp_path / "tf" / "runs.jsonl")) == 2  # resumed
    from oloraplus.outputs import shared_work_claim

    busy = next(r for r in experiments.read_runs(tmp_path / "grid" / "runs.jsonl") if r["seed"] == 1)
    seed0 = next(r for r in experiments.read_runs(tmp_path / "tf" / "runs.jsonl")
                 if (r["method"], r["ratio"]) == (busy["method"], busy["ratio"]))
    folder = seed0["run_dir"].removesuffix("-s0") + "-s1"  # where the rescore of `busy` goes
    with shared_work_claim(experiments.claim_path(tmp_path / "tf", folder)) as mine:  # another process's
        assert mine
        outcome = experiments.rescore_grid(tmp_path / "grid", tmp_path / "tf", "teacher-forced", log=lambda _: None)
    assert outcome.elsewhere == [busy["key"]] and len(outcome.done) == 1 and len(scored) == 3  # passed over
    again = experiments.rescore_grid(tmp_path / "grid", tmp_path / "tf", "teacher-forced", log=lambda _: None)
    assert again.done == [busy["key"]] and len(again.skipped) == 3 and len(scored) == 4


def test_track_dynamics_applies_to_chosen_seeds_and_does_not_block_resume(tmp_path, monkeypatch):
    specs = GridSpecForTest(track_dynamics=5).expand()
    tracked = {(s.seed, s.flags.get("track_dynamics")) for s in specs}
    assert tracked == {(0, 5), (1, None)}
    monkeypatch.setattr("oloraplus.experiments.grid.train", _fake_results_train)
    run_grid(specs, tmp_path / "g", log=lambda _: None)
    # The same grid without tracking counts those runs as done (tracking does not change results).
    outcome = run_grid(GridSpecForTest().expand(), tmp_path / "g", log=lambda _: None)
    assert not outcome.done and len(outcome.skipped) == len(specs)


def GridSpecForTest(**flags):
    return experiments.GridSpec(models=["m"], ratios=[16.0], seeds=2, flags={"n_train": 10, **flags})


def _fake_results_train(config):
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    results = {"metrics": {"eval_loss": 1.0, "perplexity": 1, "bleu": 1, "rouge1": 1, "rouge2": 1, "rougeL": 1},
               "config": asdict(config)}
    (out / "results.json").write_text(json.dumps(results))
    return results
