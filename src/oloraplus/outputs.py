"""Output paths that are safe to write: checked first, claimed by one writer, replaced atomically.

Every command that writes a folder (``train``, ``evaluate``, ``export``) or a file (``bench``)
goes through here, so that no user mistake destroys inputs or finished work:

- **checked before anything is written** (:func:`check_output_folder`, :func:`check_output_file`):
  refused are an empty path, a path under a file, a dangling symlink, a name or path too long for
  the file system, a folder that cannot be written, and an output that is, holds or lies above
  an input (``--data``, ``--model``, ``--adapter``), the working folder, the home folder or a
  model cache (``$OLORAPLUS_HOME`` also below it);
- **one writer per output** (:func:`open_output`): an exclusive ``flock`` on ``.NAME.lock``
  beside the output, taken before anything is changed and held until the output is committed.
  A second process meets it at once (one ``error:`` line naming the holder's pid); the kernel
  drops the lock when its process dies, so a killed run never blocks the next one;
- **replaced atomically**: a run that replaces its output (``--overwrite``) is written into
  ``.NAME.partial`` beside it, and only :func:`commit_output` swaps it in (one
  ``renameat2(RENAME_EXCHANGE)`` on Linux), after which the old content is removed. Until then the
  old output is untouched; a run that fails or is killed leaves it as it was.
- ``--overwrite`` replaces only what oloraplus wrote: a non-empty folder without any of the
  expected entries (``markers``) is refused rather than deleted.

This module sits in the lowest layer (beside ``files``) because ``method.export`` needs it too.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from oloraplus.errors import UserError

# What a run folder of ``oloraplus train`` / ``evaluate`` holds (any one of them marks it as ours).
RUN_MARKERS = ("results.json", "adapter", "checkpoints", "predictions.jsonl", "eval_losses.json", "dynamics.jsonl")

# What an ``oloraplus export`` output holds: a PEFT adapter or a full checkpoint.
MODEL_MARKERS = ("adapter_config.json", "config.json")

# Room left in a path for what a run writes below its folder
# (checkpoints/checkpoint-N/adapter_model.safetensors and the like) and for the staging suffix.
_PATH_ROOM = 128
_STAGING_SUFFIX = ".partial"
_OLD_SUFFIX = ".old"
_LOCK_SUFFIX = ".lock"


def home_cache() -> Path | None:
    """``$OLORAPLUS_HOME`` (default ``~/.cache/oloraplus``); None when it is set but empty."""
    value = os.environ.get("OLORAPLUS_HOME")
    if value is None:
        return _home() / ".cache" / "oloraplus"
    return Path(value).expanduser() if value.strip() else None


def _home() -> Path:
    try:
        return Path.home()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        return Path(os.path.abspath(os.sep))


def check_home(path: Path | None, writable: bool = False) -> Path:
    """Refuse an unusable ``$OLORAPLUS_HOME`` in one line (before any download or conversion)."""
    if path is None:
        raise UserError("OLORAPLUS_HOME is set but empty; unset it or set it to a folder")
    what = f"OLORAPLUS_HOME {path}"
    _check_path_shape(path, what, folder=True)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} is a file, not a folder; set OLORAPLUS_HOME to a folder")
    if writable:
        check_writable(path, what)
    return path


# ----------------------------------------------------------------------------- read-only checks


def check_output_folder(output: str | Path, inputs: Iterable[str | Path] = (), flag: str = "--output") -> Path:
    """Refuse a folder output that cannot or must not be written; returns its resolved path.

    Read-only: nothing is created. ``inputs`` are what the command reads (paths that do not exist
    locally, such as hub ids, are ignored).
    """
    out = _given(output, flag)
    label = f"{flag} {output}"
    _check_path_shape(out, label, folder=True)
    if out.exists() and not out.is_dir():
        raise UserError(f"{label} is an existing file; give a folder path")
    real = out.resolve()
    _check_not_protected(out, real, label, inputs)
    return real


def check_output_file(output: str | Path, inputs: Iterable[str | Path] = (), flag: str = "--output") -> Path:
    """Refuse a file output that cannot or must not be written (its folder is probed for writing)."""
    out = _given(output, flag)
    label = f"{flag} {output}"
    _check_path_shape(out, label, folder=False)
    if out.is_dir():
        raise UserError(f"{label} is a folder; pass a file path")
    real = out.resolve()
    for source in _existing(inputs):
        if real in _forms(source):
            raise UserError(f"{label} would overwrite the input {source}; choose another file")
    check_writable(real.parent, label)
    return real


def check_writable(folder: Path, label: str) -> None:
    """Refuse a folder (or, if it does not exist yet, its nearest existing parent) that cannot be
    written: a probe file is created and removed there."""
    folder = Path(folder)
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UserError(f"{label}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".oloraplus-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UserError(f"{label}: cannot write in {existing} ({reason}); choose a writable folder") from None


def _given(output: str | Path, flag: str) -> Path:
    if output is None or not str(output).strip():
        raise UserError(f"{flag} is empty; give a path")
    return Path(os.path.abspath(os.path.expanduser(str(output))))


def _check_path_shape(path: Path, label: str, folder: bool) -> None:
    """A name or path too long for its file system, a path under a file, a dangling symlink."""
    path = Path(os.path.abspath(path))
    existing = _nearest_existing(path)
    name_max, path_max = _limits(existing if existing.is_dir() else existing.parent)
    # the staging (.NAME.partial) and lock names are a few characters longer than NAME
    room = len(_STAGING_SUFFIX) + 2 if folder else len(".tmp") + 10
    parts = path.relative_to(existing).parts if existing != path else (path.name,)
    for i, part in enumerate(parts):
        limit = name_max - (room if i == len(parts) - 1 else 0)
        if len(os.fsencode(part)) > limit:
            raise UserError(f"{label}: the name '{part[:40]}...' is {len(os.fsencode(part))} bytes long; "
                            f"at most {limit} fit here")
    extra = _PATH_ROOM if folder else room
    if len(os.fsencode(str(path))) + extra > path_max:
        raise UserError(f"{label} is too long ({len(os.fsencode(str(path)))} bytes; at most "
                        f"{path_max - extra} fit here); choose a shorter path")
    for part in (path, *path.parents):
        if os.path.exists(part):
            break
        if os.path.islink(part):
            where = label if part == path else f"{label}: {part}"
            raise UserError(f"{where} is a symlink to {os.readlink(part)}, which does not exist; remove the "
                            "link or give another path")
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise UserError(f"{label} lies under {parent}, which is a file, not a folder")


def _limits(folder: Path) -> tuple[int, int]:
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    try:
        path_max = os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        path_max = 4096
    return name_max or 255, path_max or 4096


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.exists(path) and path != path.parent:  # (Path.exists raises on a too-long name)
        path = path.parent
    return path


def _forms(path: str | Path) -> set[Path]:
    """A path as written (absolute, symlinks kept) and as resolved."""
    absolute = Path(os.path.abspath(os.path.expanduser(str(path))))
    return {absolute, absolute.resolve()}


def _existing(paths: Iterable[str | Path | None]) -> list[Path]:
    found = []
    for p in paths:
        if p is None or not str(p).strip():
            continue
        path = Path(os.path.expanduser(str(p)))
        if path.exists() or path.is_symlink():
            found.append(path)
    return found


def _protected() -> list[tuple[Path, str]]:
    places = [(Path.cwd(), "the working folder")]
    if _home() != Path(os.path.abspath(os.sep)):
        places.append((_home(), "the home folder"))
    home = home_cache()
    if home is not None:
        places.append((home, "the oloraplus cache (OLORAPLUS_HOME)"))
    hf = os.environ.get("HF_HOME") or str(_home() / ".cache" / "huggingface")
    places.append((Path(hf).expanduser(), "the Hugging Face cache (HF_HOME)"))
    return places


def _check_not_protected(out: Path, real: Path, label: str, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is, holds or lies above an input or a protected place."""
    outs = {out, real}

    def above(places: set[Path]) -> bool:
        return any(o == p or o in p.parents for o in outs for p in places)

    for place, what in _protected():
        if above(_forms(place)):
            raise UserError(f"{label} is or holds {what} ({place}); give the output a folder of its own")
    home = home_cache()
    if home is not None and any(h in o.parents for o in outs for h in _forms(home)):
        raise UserError(f"{label} lies inside the oloraplus cache (OLORAPLUS_HOME {home}); write elsewhere")
    for source in _existing(inputs):
        if above(_forms(source)):
            raise UserError(f"{label} would overwrite the input {source}; choose another folder")


# ----------------------------------------------------------------------------- claiming and replacing


@dataclass
class _Claim:
    real: Path  # the output folder (resolved)
    work: Path  # where the run writes: ``real`` itself, or the staging folder beside it
    staged: bool
    created: list[Path]  # folders this claim created (removed again if it is abandoned while empty)
    lock_fd: int | None
    lock_path: Path


_CLAIMS: dict[Path, _Claim] = {}


def staging_folder(output: str | Path) -> Path:
    """Where a replacing run is written before it is swapped in: ``.NAME.partial`` beside it."""
    real = Path(os.path.abspath(output)).resolve()
    return real.parent / f".{real.name}{_STAGING_SUFFIX}"


def open_output(
    output: str | Path,
    overwrite: bool,
    resume: bool = False,
    inputs: Iterable[str | Path] = (),
    markers: Iterable[str] = RUN_MARKERS,
    flag: str = "--output",
    stage: bool | None = None,
) -> Path:
    """Check and claim a folder output; returns the folder to write into.

    Without ``overwrite`` the run writes in place (an existing folder must be empty, unless
    ``resume``); with it (or with ``stage=True``), into :func:`staging_folder` until
    :func:`commit_output`. Every check runs before anything is created; the lock is taken before
    anything is changed.
    """
    if stage is None:
        stage = bool(overwrite and not resume)
    inputs = list(inputs)
    real = check_output_folder(output, inputs, flag)
    label = f"{flag} {output}"
    old = _CLAIMS.pop(real, None)
    if old is not None:  # an earlier run in this process failed without cleaning up
        _abandon(old)
    check_writable(real.parent, label)
    created = _make_parents(real.parent)
    lock_path = real.parent / f".{real.name}{_LOCK_SUFFIX}"
    try:
        fd = _lock(lock_path, label)
    except BaseException:
        _remove_empty(created)
        raise
    claim = _Claim(real, real, stage, created, fd, lock_path)
    try:
        _recover(real)
        if real.is_dir() and any(real.iterdir()) and not resume:
            if not overwrite:
                raise UserError(f"{label} is not empty; pass --overwrite to replace it, or choose another folder")
            _check_ours(real, label, tuple(markers))
        if real.exists():
            if not os.access(real, os.W_OK | os.X_OK) and not claim.staged:
                raise UserError(f"{label}: cannot write in {real} (permission denied); choose a writable folder")
        if claim.staged:
            claim.work = staging_folder(real)
            claim.work.mkdir()
        elif not real.exists():
            real.mkdir()
            claim.created.append(real)
    except BaseException:
        _abandon(claim)
        raise
    _CLAIMS[real] = claim
    return claim.work


def commit_output(output: str | Path) -> Path:
    """Finish a claimed output: swap a staged run in (the old content is removed after), release
    the lock. Returns the output folder. A no-op for an output this process did not claim."""
    real = Path(os.path.abspath(output)).resolve()
    claim = _CLAIMS.pop(real, None)
    if claim is None:
        return real
    try:
        if claim.staged:
            _swap_in(claim.work, real)
    finally:
        _release(claim)
    return real


def abandon_output(output: str | Path) -> None:
    """Give up a claimed output after a failure: remove the staged run (the old output stays as it
    was) and folders this claim created while they are empty, release the lock.

    An in-place run keeps what it wrote (``--resume`` continues from its checkpoints)."""
    try:
        real = Path(os.path.abspath(output)).resolve()
    except (OSError, RuntimeError, ValueError):  # a path that was never claimed (too long, a loop)
        return
    claim = _CLAIMS.pop(real, None)
    if claim is not None:
        _abandon(claim)


@contextlib.contextmanager
def claimed(output: str | Path):
    """Abandon ``output`` if the block fails (commit it yourself when the block succeeds)."""
    try:
        yield
    except BaseException:
        abandon_output(output)
        raise


def _abandon(claim: _Claim) -> None:
    try:
        if claim.staged and claim.work != claim.real:
            shutil.rmtree(claim.work, ignore_errors=True)
    finally:
        _release(claim)
    _remove_empty(claim.created)  # after the lock file is gone, so that its folder can be empty


@atexit.register
def _abandon_all() -> None:
    for real in list(_CLAIMS):
        with contextlib.suppress(Exception):
            abandon_output(real)


def _make_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            _remove_empty(missing[missing.index(path) + 1:])
            raise UserError(f"cannot create {path}: {os.strerror(exc.errno) if exc.errno else exc}") from None
    return missing[::-1]


def _remove_empty(folders: list[Path]) -> None:
    for path in reversed(folders):  # deepest first
        with contextlib.suppress(OSError):
            path.rmdir()


def _check_ours(real: Path, label: str, markers: tuple[str, ...]) -> None:
    names = {p.name for p in real.iterdir()}
    if markers and not names & set(markers):
        example = sorted(names)[0]
        raise UserError(
            f"{label} holds files oloraplus did not write (e.g. {example}); --overwrite only replaces an "
            "earlier output of the same command: choose another folder, or empty this one yourself"
        )


def _recover(real: Path) -> None:
    """Under the lock: undo what a process killed while replacing ``real`` left beside it."""
    old = real.parent / f".{real.name}{_OLD_SUFFIX}"
    staging = staging_folder(real)
    if old.is_dir() and not real.exists():
        # killed between the two renames of _swap_in: the staged run was complete, the old one was
        # about to be removed
        os.replace(staging if staging.is_dir() else old, real)
    for leftover in (staging, old):
        if leftover.is_symlink() or leftover.is_file():
            leftover.unlink()
        elif leftover.exists():
            shutil.rmtree(leftover)


def _swap_in(staged: Path, real: Path) -> None:
    """Put ``staged`` where ``real`` is, in one step where the system allows; then drop the old."""
    if not real.exists() and not real.is_symlink():
        os.replace(staged, real)
        return
    if real.is_symlink():  # a link to the old output: replace the link itself
        real.unlink()
        os.replace(staged, real)
        return
    if _exchange(staged, real):
        shutil.rmtree(staged, ignore_errors=True)  # now the old content (what is left: swept next time)
        return
    old = real.parent / f".{real.name}{_OLD_SUFFIX}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(real, old)
    os.replace(staged, real)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, ImportError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _lock(path: Path, label: str) -> int | None:
    """Take the exclusive lock on ``path`` or fail at once, naming the process that holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise UserError(f"{label}: cannot create the lock file {path} "
                            f"({os.strerror(exc.errno) if exc.errno else exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UserError(f"{label} is being written by another oloraplus process (pid {holder}); "
                                "wait for it to finish, or choose another folder") from None
            raise UserError(f"{label}: cannot lock {path} ({os.strerror(exc.errno)})") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder removed while we opened it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _release(claim: _Claim) -> None:
    if claim.lock_fd is None:
        return
    with contextlib.suppress(OSError):
        claim.lock_path.unlink()  # while still held: a waiting opener then sees another inode and retries
    with contextlib.suppress(OSError):
        os.close(claim.lock_fd)
    claim.lock_fd = None


@contextlib.contextmanager
def _flock(path: str | Path, wait: bool):
    """Open (creating) the lock file ``path`` and take an exclusive ``flock`` on it for the block;
    yields True, or, with ``wait`` False and another holder, False at once (holding nothing)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if wait or exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def waiting_lock(path: str | Path):
    """Hold an exclusive ``flock`` on the file ``path`` for the block, waiting for any other holder.

    For work that a second process should wait for and then reuse rather than redo or refuse (a
    model conversion into the shared cache). The kernel drops the lock when its process dies.
    """
    with _flock(path, wait=True):
        yield


@contextlib.contextmanager
def shared_work_claim(path: str | Path):
    """Claim one piece of work shared out between processes; yields whether this process has it.

    Takes an exclusive ``flock`` on the file ``path`` without waiting: ``True`` and held for the
    block, or ``False`` at once when another process holds it (that process is doing the work;
    pass it over). The kernel drops the lock when its process dies, so a killed worker's piece is
    free again. The file stays (an empty marker); without POSIX locks every claim succeeds.
    """
    try:
        import fcntl  # noqa: F401  (only whether this system has it)
    except ImportError:  # not POSIX: no locking
        yield True
        return
    with _flock(path, wait=False) as mine:
        yield mine
