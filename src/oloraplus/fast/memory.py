"""Memory patches: keep freed memory in the process (glibc ``mallopt``) instead of unmapping it,
and PyTorch's CPU blocks page-aligned and advised for transparent huge pages."""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory(device: str) -> bool:
    """On CPU under glibc, let freed memory be reused instead of handed back to the kernel.

    By default glibc's malloc serves every block of 32 MiB or more with its own ``mmap`` and
    unmaps it on ``free``, and it trims the heap's free top; the next block of that size is then
    faulted in again, one zero-filled 4 KiB page at a time. A training step allocates and frees
    such blocks all the time (the LM head's logits: 256 rows x 262k vocabulary x 4 bytes is 268 MB
    per chunk on Gemma), and those page faults can cost as much as the arithmetic around them.
    With mmap off and the trim threshold at 2 GiB, freed blocks stay in the heap for the next
    allocation: the same arithmetic, fewer page faults, a somewhat higher peak RSS (the measured
    gain per model and the memory cost: bench/NOTES.md, ``bench/head_passes_probe.py``). The
    setting is process-wide and cannot be undone, so only ``oloraplus train``/``evaluate``/
    ``bench`` call it; in your own script call it once at the start. Returns whether it was
    applied (CPU, Linux, glibc).
    """
    if not device.startswith("cpu") or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # glibc's, from the process's own symbol table
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory(device: str) -> bool:
    """On CPU under glibc, hand the heap's free pages back to the kernel once (``malloc_trim(0)``).

    With :func:`keep_freed_memory` nothing freed is returned to the kernel on its own, so the
    memory of a one-off phase stays in the process for its whole life: loading the model in fp32
    and storing its frozen weights in bf16 frees the fp32 copies (4 bytes per weight), and those
    pages would stay resident through training. ``oloraplus train --gradient-checkpointing`` (the
    user chose memory over speed) sets :func:`keep_freed_memory` only after the model is prepared,
    so that those copies are unmapped as they are freed, and calls this once before setting it; the
    training's own blocks are kept for reuse afterwards. Without checkpointing it is not
    called: the fp32 pages are then reused by the training's first steps, which were slower with
    them handed back (bench/NOTES.md). Returns whether it ran.
    """
    if not device.startswith("cpu") or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    ctypes.CDLL(None).malloc_trim(0)
    return True


# PyTorch's CPU allocator (c10 ``alloc_cpu``) reads this once, at its first allocation: with "1" every
# block is page-aligned and every block of 2 MiB or more is advised for transparent huge pages.
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def use_huge_page_allocations(environ=None) -> bool:
    """Ask PyTorch to page-align its CPU blocks and advise the large ones for huge pages; call it
    before ``import torch``. Returns whether the setting is in effect for this process (or, given
    ``environ``, a child process's environment to prepare, for the child that will run with it).

    PyTorch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first allocation, so this can only take
    effect before torch is imported: the ``oloraplus`` command calls it first thing
    (``oloraplus.__main__``), before any flag is parsed, so ``--no-fast`` does not undo it. A value
    the environment already has is left alone (``THP_MEM_ALLOC_ENABLE=0`` opts out); once torch is
    imported nothing is set. The arithmetic is the same (same losses bit for bit); with freed
    memory kept (:func:`keep_freed_memory`) the heap fragments far less, so a step's peak RSS
    is lower, at the same or better speed (measured: bench/NOTES.md).
    """
    if environ is None:
        environ = os.environ
        if "torch" in sys.modules:  # too late for this process: say what it runs with
            return environ.get(HUGE_PAGES_ENV) == "1"
    environ.setdefault(HUGE_PAGES_ENV, "1")
    return environ[HUGE_PAGES_ENV] == "1"
