"""Errors that are the user's to fix.

Every problem a user can cause (a bad YAML file, an unknown block, a missing model, an unreachable
storage) is raised as :class:`UserError` with one line that names the file, key or value. The CLI
prints that line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "first_line"]


class UserError(Exception):
    """A problem in the user's input, reported as one line without a traceback."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name where it has none): what a
    one-line error quotes of a library's exception."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
