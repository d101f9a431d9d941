"""Provenance of a run: the oloraplus commit that produced it (``train.source_commit``) and the host."""
import shutil
import subprocess
from pathlib import Path

import pytest

import oloraplus
from oloraplus.training.provenance import host, library_versions, source_commit


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_source_commit_names_the_checkout_and_says_when_tracked_files_changed(tmp_path):
    package = tmp_path / "repo" / "src" / "oloraplus"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    repo = tmp_path / "repo"
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert source_commit(package) == head
    (package / "notes.txt").write_text("untracked files do not make it dirty\n")
    assert source_commit(package) == head
    (package / "__init__.py").write_text("x = 2\n")
    assert source_commit(package) == head + "+dirty"


def test_source_commit_is_none_for_an_installed_copy_even_inside_another_repository(tmp_path):
    outside = tmp_path / "site-packages" / "oloraplus"
    outside.mkdir(parents=True)
    assert source_commit(outside) is None
    # a virtual environment inside some repository: the package is not at src/oloraplus of it
    repo = tmp_path / "project"
    installed = repo / ".venv" / "lib" / "site-packages" / "oloraplus"
    installed.mkdir(parents=True)
    (repo / "README").write_text("another project\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "README")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "other")
    assert source_commit(installed) is None
    # src/oloraplus of a folder that is not itself the top of a work tree
    nested = repo / "vendor" / "src" / "oloraplus"
    nested.mkdir(parents=True)
    assert source_commit(nested) is None


def test_library_versions_record_the_commit_of_this_checkout():
    root = Path(oloraplus.__file__).resolve().parents[2]
    commit = library_versions()["oloraplus_commit"]
    if (root / ".git").exists():  # the tests run from a clone (as CI does)
        assert commit.removesuffix("+dirty") == _git(root, "rev-parse", "HEAD")
    else:
        assert commit is None


@pytest.mark.skipif(shutil.which("lscpu") is None or not Path("/proc/cpuinfo").exists(), reason="needs lscpu")
def test_host_names_the_cpu_as_lscpu_does():
    fields = dict(line.split(":", 1) for line in _lscpu().splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    found = host()
    assert found["cpu_family"] == fields["CPU family"] and found["cpu_model"] == fields["Model"]
    flags = set(fields.get("Flags", "").split())
    assert found["avx512_bf16"] == ("avx512_bf16" in flags) and found["amx_bf16"] == ("amx_bf16" in flags)


def _lscpu() -> str:
    return subprocess.run(["lscpu"], check=True, capture_output=True, text=True, env={"LC_ALL": "C"}).stdout
