"""Outputs that cannot destroy inputs or finished work (``oloraplus.outputs``), by fault injection.

1. ``--overwrite`` never deletes an input, the working folder, a cache or a folder it did not
   write, and replaces an output only once the new run is complete (killed, failed or with a bad
   input, the old output stays as it was);
4. one writer per output (a lock a second process meets at once, and that a killed process does
   not leave held); grid run folders differ for different model names;
5. unusable output paths (under a file, too long, dangling symlink, unwritable) and
   ``OLORAPLUS_HOME`` fail in one line before anything is loaded;
6. result files follow the umask.

Every refusal is one ``error:`` line, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_error_line, make_records

import oloraplus.models.loading
import oloraplus.outputs
import oloraplus.training.recipe
from oloraplus.cli import main
from oloraplus.errors import UserError
from oloraplus.experiments.grid import RunSpec, expand_grid, run_grid, safe_name
from oloraplus.files import write_json_atomic
from oloraplus.method.trainer import KILL_AT_STEP_ENV
from oloraplus.outputs import abandon_output, commit_output, open_output, staging_folder

SMALL = ["--n-train", "8", "--n-eval", "4", "--max-new-tokens", "4", "--precision", "fp32", "--no-progress",
         "--max-steps", "1", "--rank", "4", "--method", "olora-plus", "--ratio", "4"]


@pytest.fixture(scope="module")
def checkpoint(module_checkpoint) -> Path:
    return module_checkpoint


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data" / "alpaca.json"
    path.parent.mkdir()
    path.write_text(json.dumps(make_records(40)))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded (the error must come first)."""
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the error was found")

    monkeypatch.setattr(oloraplus.training.recipe, "load_model", fail)
    monkeypatch.setattr(oloraplus.models.loading, "load_model", fail)


def train_argv(checkpoint, data, out, *extra) -> list[str]:
    return ["train", "--model", str(checkpoint), "--data", str(data), "--output", str(out), *SMALL, *extra]


def one_error(argv, capsys, needle: str) -> str:
    return assert_one_error_line(argv, capsys, needle)


def unwritable(monkeypatch, folder: Path, error: OSError) -> None:
    """Make the write probe in ``folder`` fail with ``error`` (root can write anywhere, so a chmod can't)."""
    real_mkstemp = oloraplus.outputs.tempfile.mkstemp

    def failing(*args, dir=None, **kwargs):
        if Path(dir) == folder:
            raise error
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(oloraplus.outputs.tempfile, "mkstemp", failing)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def leftovers(out: Path) -> list[str]:
    """Staging, old-copy and lock files an output's writer may leave beside it."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


@pytest.fixture
def finished(checkpoint, data, tmp_path, capsys) -> Path:
    """A finished run folder (trained for real)."""
    out = tmp_path / "finished"
    assert main(train_argv(checkpoint, data, out)) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert (out / "results.json").is_file() and leftovers(out) == []
    return out


# ----------------------------------------------------------------------------- 1. --overwrite


@pytest.mark.parametrize("target", ["data folder", "model folder", "model parent", "working folder", "empty",
                                    "home cache", "above home cache", "inside home cache", "root"])
def test_overwrite_never_replaces_an_input_the_working_folder_or_a_cache(
        target, checkpoint, data, tmp_path, monkeypatch, capsys, no_model):
    home = tmp_path / "home" / "cache"
    home.mkdir(parents=True)
    (home / "models").mkdir()
    monkeypatch.setenv("OLORAPLUS_HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    out = {"data folder": data.parent, "model folder": checkpoint, "model parent": checkpoint.parent,
           "working folder": ".", "empty": "", "home cache": home, "above home cache": home.parent,
           "inside home cache": home / "models", "root": "/"}[target]
    needle = {"data folder": "would overwrite the input", "model folder": "would overwrite the input",
              "model parent": "would overwrite the input", "working folder": "the working folder",
              "empty": "--output is empty", "home cache": "the oloraplus cache", "above home cache": "oloraplus cache",
              "inside home cache": "inside the oloraplus cache", "root": "is or holds"}[target]
    watched = [data.parent, checkpoint, work, home]
    before = [snapshot(f) for f in watched]
    one_error(train_argv(checkpoint, data, out, "--overwrite"), capsys, needle)
    assert [snapshot(f) for f in watched] == before


def test_evaluate_refuses_an_output_that_holds_its_adapter(finished, checkpoint, data, capsys, no_model):
    before = snapshot(finished)
    for out in (finished / "adapter", finished):
        one_error(["evaluate", "--model", str(checkpoint), "--data", str(data), "--adapter", str(finished / "adapter"),
                   "--output", str(out), "--overwrite", "--n-eval", "4", "--n-train", "8"], capsys,
                  "would overwrite the input")
    assert snapshot(finished) == before


def test_export_refuses_its_model_folder_and_a_foreign_folder(finished, checkpoint, tmp_path, capsys, no_model):
    foreign = tmp_path / "documents"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    before = snapshot(checkpoint), snapshot(foreign)
    base = ["export", "--model", str(checkpoint), "--adapter", str(finished / "adapter"), "--to", "lora", "--overwrite"]
    one_error([*base, "--output", str(checkpoint)], capsys, "would overwrite the input")
    one_error([*base, "--output", str(foreign)], capsys, "holds files oloraplus did not write (e.g. thesis.tex)")
    assert (snapshot(checkpoint), snapshot(foreign)) == before
    assert leftovers(foreign) == []


def test_overwrite_refuses_a_folder_it_did_not_write(checkpoint, data, tmp_path, capsys, no_model):
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.py").write_text("print('hi')")
    before = snapshot(out)
    one_error(train_argv(checkpoint, data, out, "--overwrite"), capsys, "holds files oloraplus did not write")
    assert snapshot(out) == before and leftovers(out) == []


def test_a_bad_input_leaves_the_finished_run_as_it_was(finished, checkpoint, data, tmp_path, capsys):
    before = snapshot(finished)
    one_error(train_argv(checkpoint, tmp_path / "typo.json", finished, "--overwrite"), capsys, "data file not found")
    one_error(train_argv("no-such-model", data, finished, "--overwrite"), capsys, "unknown model")
    assert snapshot(finished) == before
    assert leftovers(finished) == []  # the staged run is removed, the lock released


def test_a_run_that_fails_or_is_interrupted_leaves_the_old_output(finished, checkpoint, data, monkeypatch, capsys):
    before = snapshot(finished)

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(oloraplus.training.recipe, "run_evaluation", broken)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        main(train_argv(checkpoint, data, finished, "--overwrite"))
    assert snapshot(finished) == before and leftovers(finished) == []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(oloraplus.training.recipe, "run_evaluation", interrupted)
    assert main(train_argv(checkpoint, data, finished, "--overwrite")) == 130
    assert snapshot(finished) == before and leftovers(finished) == []


@pytest.mark.slow
def test_overwrite_replaces_the_run_only_when_the_new_one_is_complete(finished, checkpoint, data, capsys):
    old = json.loads((finished / "results.json").read_text())
    (finished / "dynamics.jsonl").write_text("{}\n")  # something the new run does not write
    # Killed in training: the old run is untouched, the staged one waits beside it.
    env = {**os.environ, KILL_AT_STEP_ENV: "2", "OMP_NUM_THREADS": "1"}
    argv = train_argv(checkpoint, data, finished, "--overwrite", "--seed", "7", "--max-steps", "3", "--save-steps", "1")
    done = subprocess.run([sys.executable, "-m", "oloraplus", *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert json.loads((finished / "results.json").read_text()) == old
    assert (finished / "dynamics.jsonl").is_file()
    assert staging_folder(finished).is_dir()  # hidden, never mistaken for a finished run

    # The next run sweeps it, replaces the old run in one step and leaves nothing beside it.
    assert main(train_argv(checkpoint, data, finished, "--overwrite", "--seed", "7")) == 0, capsys.readouterr().err
    new = json.loads((finished / "results.json").read_text())
    assert new["config"]["seed"] == 7 and old["config"]["seed"] == 0
    assert not (finished / "dynamics.jsonl").exists() and (finished / "adapter").is_dir()
    assert leftovers(finished) == []


def test_swap_without_renameat2_and_a_kill_between_the_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(oloraplus.outputs, "_exchange", lambda a, b: False)
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("old")
    work = open_output(out, overwrite=True)
    (work / "results.json").write_text("new")
    commit_output(out)
    assert (out / "results.json").read_text() == "new" and leftovers(out) == []

    # A process killed after moving the old output aside and before moving the new one in:
    # the next writer puts the finished new run in place.
    work = open_output(out, overwrite=True)
    (work / "results.json").write_text("newer")
    os.replace(out, out.parent / ".run.old")
    claim = oloraplus.outputs._CLAIMS.pop(out.resolve())  # the process "dies": its lock goes, the file stays
    os.close(claim.lock_fd)
    work = open_output(out, overwrite=True)
    assert (out / "results.json").read_text() == "newer"
    abandon_output(out)
    assert (out / "results.json").read_text() == "newer" and leftovers(out) == []


# ----------------------------------------------------------------------------- 4. collisions

HOLDER = ("import sys, time\n"
          "from oloraplus.outputs import open_output\n"
          "open_output(sys.argv[1], overwrite=False)\n"
          "print('ready', flush=True)\n"
          "time.sleep(300)\n")


def test_a_second_writer_meets_the_lock_and_a_killed_holder_does_not_keep_it(
        checkpoint, data, tmp_path, capsys, no_model):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for extra in ((), ("--overwrite",)):
            one_error(train_argv(checkpoint, data, out, *extra), capsys,
                      f"is being written by another oloraplus process (pid {holder.pid})")
        with pytest.raises(UserError, match="being written by another"):
            open_output(out, overwrite=True, markers=())
    finally:
        holder.kill()
        holder.wait()
    assert (out.parent / ".run.lock").exists()  # a SIGKILL leaves the file, but not the lock
    work = open_output(out, overwrite=False)
    assert work == out.resolve()
    abandon_output(out)
    assert leftovers(out) == [] and list(out.iterdir()) == []  # (the killed holder made the folder)
    fresh = tmp_path / "fresh" / "run"
    open_output(fresh, overwrite=False)
    abandon_output(fresh)
    assert not (tmp_path / "fresh").exists()  # what an abandoned claim created while empty is gone


@pytest.mark.slow
def test_two_processes_training_into_one_output_one_wins(checkpoint, data, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "oloraplus", *train_argv(checkpoint, data, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0, results
    assert codes[1] == 2, results
    loser = next(err for code, err in results if code == 2)
    assert loser.strip().startswith("error: ") and len(loser.strip().splitlines()) == 1, loser
    assert "being written by another oloraplus process" in loser or "is not empty" in loser
    assert (out / "results.json").is_file() and leftovers(out) == []


def test_grid_run_folders_differ_for_different_model_names():
    # names that read alike after cleaning get different folders ...
    for a, b in [("org/name", "org--name"), ("a b", "a_b"), ("./m", "m"), ("/x/model", "x/model"),
                 ("x y", "x?y")]:
        assert safe_name(a) != safe_name(b), (a, b)
        assert "/" not in safe_name(a) and "/" not in safe_name(b)
    # ... while registry names and hub ids keep the folders of existing grids (results/, --reuse)
    for name, folder in [("smollm2-135m", "smollm2-135m"), ("gemma3-270m", "gemma3-270m"),
                         ("TinyLlama/TinyLlama_v1.1", "TinyLlama--TinyLlama_v1.1"), ("facebook/opt-1.3b",
                                                                                      "facebook--opt-1.3b")]:
        assert safe_name(name) == folder
    assert RunSpec("org/name", "olora", 1.0, 0).folder != RunSpec("org--name", "olora", 1.0, 0).folder
    assert len(safe_name("/" + "long/" * 100 + "model")) < 120


def test_grid_refuses_models_that_differ_only_in_case(tmp_path, monkeypatch):
    import oloraplus.experiments.grid as grid

    monkeypatch.setattr(grid, "local_data_file", lambda data: None)
    monkeypatch.setattr(grid, "train", lambda config: pytest.fail("a run started"))
    specs = expand_grid(["Org/Model", "org/model"], ratios=[4], seeds=1)
    with pytest.raises(UserError, match="would share the run folder"):
        run_grid(specs, tmp_path, log=lambda s: None)


# ----------------------------------------------------------------------------- 5. paths


def test_unusable_output_paths_fail_before_anything_is_loaded(checkpoint, data, tmp_path, capsys, no_model):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    cases = [
        (a_file / "run", "which is a file, not a folder"),
        (tmp_path / ("n" * 300), "fit here"),
        (tmp_path / "/".join(["deep" * 50] * 30), "too long"),
        (dangling, "which does not exist"),
        (dangling / "run", "which does not exist"),
    ]
    for out, needle in cases:
        one_error(train_argv(checkpoint, data, out), capsys, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "dangling", "data"]


def test_an_unwritable_output_folder_fails_at_once(checkpoint, data, tmp_path, monkeypatch, capsys, no_model):
    locked = tmp_path / "read-only"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)
    else:  # root writes anywhere: make the probe fail as a read-only file system would
        unwritable(monkeypatch, locked, OSError(30, "Read-only file system"))
    try:
        one_error(train_argv(checkpoint, data, locked / "runs" / "a"), capsys, f"cannot write in {locked}")
        export = ["export", "--model", str(checkpoint), "--adapter", str(tmp_path), "--to", "lora"]
        (tmp_path / "adapter_config.json").write_text("{}")
        one_error([*export, "--output", str(locked / "x")], capsys, f"cannot write in {locked}")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_bench_checks_its_output_before_measuring(checkpoint, tmp_path, monkeypatch, capsys):
    records = tmp_path / "records.json"
    records.write_text(json.dumps(make_records(200)))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    base = ["bench", "--quick", "--model", str(checkpoint), "--data", str(records)]
    one_error([*base, "--output", str(a_file / "bench.json")], capsys, "which is a file, not a folder")
    one_error([*base, "--output", str(records)], capsys, "would overwrite the input")
    one_error([*base, "--output", ""], capsys, "--output is empty")
    unwritable(monkeypatch, tmp_path, PermissionError(13, "Permission denied"))
    one_error([*base, "--output", str(tmp_path / "bench.json")], capsys, "cannot write in")
    assert json.loads(records.read_text()) == make_records(200)


@pytest.mark.parametrize("home", ["file", "under a file", "empty", "read-only"])
def test_a_bad_oloraplus_home_fails_before_any_conversion(home, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    value = {"file": str(a_file), "under a file": str(a_file / "home"), "empty": "",
             "read-only": str(tmp_path / "ro-home")}[home]
    monkeypatch.setenv("OLORAPLUS_HOME", value)
    if home == "read-only":
        real_mkstemp = oloraplus.outputs.tempfile.mkstemp

        def read_only(*args, dir=None, **kwargs):
            if Path(dir) == tmp_path:
                raise OSError(30, "Read-only file system")
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(oloraplus.outputs.tempfile, "mkstemp", read_only)

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was read before OLORAPLUS_HOME was checked")

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_conversion)
    needle = {"file": "is a file, not a folder", "under a file": "which is a file, not a folder",
              "empty": "OLORAPLUS_HOME is set but empty", "read-only": "cannot write in"}[home]
    line = one_error(["models", "pull", str(gguf)], capsys, needle)
    assert "OLORAPLUS_HOME" in line


# ----------------------------------------------------------------------------- 6. small


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_result_files_follow_the_umask(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "results.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == mode


@pytest.mark.slow
def test_a_two_process_overwrite_run_stages_every_rank_and_swaps_once(checkpoint, data, tmp_path):
    """Under torchrun every rank writes checkpoints (rank 1 its RNG state) into the staged folder,
    and rank 0 alone swaps it in at the end."""
    import uuid

    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "ddp"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')
    tag = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "OLORAPLUS_TEST_TAG": tag}
    env.pop("WORLD_SIZE", None)
    argv = [*train_argv(checkpoint, data, out, "--overwrite", "--save-steps", "2", "--max-steps", "2",
                        "--batch-size", "4")]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "oloraplus", *argv], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        _, stderr = launcher.communicate(timeout=240)
    finally:
        marker = f"OLORAPLUS_TEST_TAG={tag}".encode()
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), 9)
            except OSError:
                continue
        if launcher.poll() is None:
            launcher.communicate()
    assert launcher.returncode == 0, stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["training"]["processes"] == 2
    assert (out / "checkpoints" / "checkpoint-2" / "rng_state_1.pth").is_file()
    assert leftovers(out) == []


def test_grid_and_analyze_outputs_are_checked_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    """sweep / rescore / analyze refuse an output that is their input, the working folder or empty,
    before a run starts (a grid writes to its folder for hours)."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(make_records(20)))
    monkeypatch.chdir(tmp_path)
    sweep = ["sweep", "--models", str(checkpoint), "--data", str(data), "--seeds", "1", "--no-progress"]
    one_error([*sweep, "--output", "."], capsys, "working folder")
    one_error([*sweep, "--output", str(checkpoint)], capsys, "would overwrite the input")
    one_error([*sweep, "--output", ""], capsys, "--output is empty")
    grid = tmp_path / "grid"
    grid.mkdir()
    one_error(["rescore", str(grid), "--metrics-mode", "teacher-forced", "--output", str(grid)], capsys,
              "would overwrite the input")
    one_error(["analyze", str(grid), "--output", str(grid)], capsys, "would overwrite the input")
    assert list(grid.iterdir()) == [] and not (tmp_path / "runs.jsonl").exists()
