"""Data-parallel runs: which process this is, and how ``--batch-size`` splits across processes.

``torchrun`` and ``accelerate launch`` start one process per device and tell each one its place
through the environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``). The Hugging Face Trainer
reads the same variables and wraps the model in DDP by itself (gloo on CPU, NCCL on CUDA), so
``oloraplus train`` only has to decide three things, all here:

- ``--batch-size`` is the GLOBAL batch: each process takes ``batch_size / world_size`` examples
  per step, so a run on 1 or N processes takes the same optimiser steps on the same batches and
  its results stay comparable (it must divide evenly: checked before anything is loaded);
- only the main process (rank 0) writes the run folder (adapter, predictions, results.json) and
  runs the evaluation; the other ranks wait for it (``ranks_finish_together``) and all of them
  leave together, so that no process tears down its connections while another still has them;
- each process uses its own GPU (``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

from oloraplus.errors import UserError

# How long the other ranks wait for rank 0's evaluation: longer than any evaluation, while a
# failing rank 0 still ends them at once (the launcher stops every worker when one fails).
FINISH_TIMEOUT = timedelta(days=7)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world_size() -> int:
    """Number of processes in this run (1 without torchrun / accelerate launch)."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def rank() -> int:
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    return rank() == 0


def per_device_batch_size(batch_size: int, processes: int | None = None) -> int:
    """The share of the global ``batch_size`` each process takes per optimiser step."""
    processes = processes or world_size()
    if batch_size % processes:
        raise UserError(
            f"--batch-size {batch_size} is the global batch and must divide evenly across {processes} "
            f"processes; use a multiple of {processes}"
        )
    return batch_size // processes


def local_device(device: str, gpus: int | None = None) -> str:
    """``cuda`` becomes this process's GPU under torchrun; other devices are unchanged.

    More processes on a node than visible GPUs is refused here, in one line, instead of a CUDA
    "invalid device ordinal" deep inside the model's first ``.to()``.
    """
    if device == "cuda" and world_size() > 1:
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if local_rank() >= gpus:
            raise UserError(
                f"this process has LOCAL_RANK {local_rank()} but only {gpus} GPU(s) are visible; "
                f"start at most {gpus} process(es) per node (torchrun --nproc_per_node {gpus}), "
                "or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run data-parallel on CPU"
            )
        return f"cuda:{local_rank()}"
    return device


def gather_objects(obj) -> list:
    """``obj`` from every process, in rank order (``[obj]`` outside a distributed run).

    A collective call: every rank must call it, at the same point.
    """
    if not _initialized():
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _initialized() -> bool:
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def ranks_finish_together():
    """Every rank leaves this block at the same time, also when rank 0 fails inside it.

    After training, rank 0 evaluates and writes while the other ranks have nothing left to do.
    Had they exited at once, each would tear down its process group while rank 0 still held the
    connections (a worker then aborted at exit now and then: "terminate called without an active
    exception"). Here they wait on a barrier of their own group, whose timeout (a week) outlasts
    any evaluation; the default group's 30 min might not. A collective: every rank must enter it
    at the same point. A no-op outside a distributed run.
    """
    if not _initialized():
        yield
        return
    import torch.distributed as dist

    group = dist.new_group(backend="gloo" if dist.is_gloo_available() else None, timeout=FINISH_TIMEOUT)
    try:
        yield
    finally:
        dist.barrier(group=group)
        dist.destroy_process_group(group)


def shutdown() -> None:
    """Tear down the default process group at the end of a command (every rank; else a no-op)."""
    if _initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
