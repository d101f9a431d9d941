"""What a run records about where it ran: the host, library versions and the oloraplus commit."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from oloraplus.fast.memory import HUGE_PAGES_ENV


def library_versions() -> dict:
    names = ["oloraplus", "torch", "transformers", "peft", "accelerate", "datasets", "sacrebleu", "rouge-score"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["oloraplus_commit"] = source_commit()
    versions["python"] = platform.python_version()
    return versions


def host() -> dict:
    """The machine, as exactly as ``/proc/cpuinfo`` names the CPU: hosts that all call themselves "AMD EPYC"
    differ by generation (AMD family 25 is Zen 3 or 4, 26 is Zen 5), and bf16 kernels, so the rounding
    of a run's sums, differ between CPUs with AMX, with avx512_bf16 only, and without either. Also whether
    PyTorch's CPU blocks were advised for huge pages (``fast.memory.use_huge_page_allocations``) and the
    kernel's transparent huge page mode, which together decide how much a step's memory fragments."""
    import torch

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": info.get("model name") or platform.processor(), "cpu_family": info.get("cpu family"),
            "cpu_model": info.get("model"), "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "gpu": gpu, "platform": platform.platform(),
            "huge_page_allocations": os.environ.get(HUGE_PAGES_ENV) == "1",
            "transparent_hugepage": _transparent_hugepage()}


def _transparent_hugepage() -> str | None:
    """The kernel's transparent huge page mode (the bracketed word of its sysfs setting), or None."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def source_commit(package_dir: Path | None = None) -> str | None:
    """The git commit of the oloraplus checkout that is running ("+dirty" if tracked files changed).

    None for an installed copy: only a package that sits at ``src/oloraplus`` of a git work tree
    is asked, so a virtual environment inside some other repository never reports that one's commit.
    """
    package_dir = (package_dir or Path(__file__).parent.parent).resolve()  # the oloraplus package folder
    root = package_dir.parent.parent
    if package_dir != root / "src" / "oloraplus":
        return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("rev-parse", "--show-toplevel") != str(root):
        return None
    head = git("rev-parse", "HEAD")
    if head is None:
        return None
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
