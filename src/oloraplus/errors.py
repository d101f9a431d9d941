"""One exception type for mistakes the user can fix.

The CLI turns a :class:`UserError` into one ``error: ...`` line on stderr and exit code 2;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input (file, flag, model name): the message says what is wrong and how to fix it."""


def check_positive(name: str, value, integer: bool = False) -> None:
    """Reject zero, negative, NaN and infinite values with a one-line message."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    try:
        ok = float(value) > 0 and float(value) < float("inf")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{name} must be a positive finite number, got {value!r}")


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr: something the user should know, that does not stop the run."""
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)
