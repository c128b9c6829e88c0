"""User-facing errors: the CLI prints them in one line and exits with status 2, without a traceback."""

from __future__ import annotations


class MessError(Exception):
    """A problem with the user's input (a file, a field, a value) that names what is wrong and what is allowed."""


class SpaceError(MessError):
    """A search-space file that does not validate."""


class DataError(MessError):
    """A data set that is missing, malformed or does not match the space."""


def remote_cause(err: BaseException) -> BaseException:
    """The exception first raised inside a Ray actor, task or Tune trial that `err` wraps (else `err` itself)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)   # ray.exceptions.RayTaskError and its dual subclasses
        if isinstance(cause, BaseException):
            err = cause
        elif type(err).__name__ in ("TuneError", "TrainingFailedError") and isinstance(err.__cause__, BaseException):
            err = err.__cause__
        else:
            break
    return err


def is_remote(err: BaseException) -> bool:
    """Whether `err` carries a stack from a Ray worker (its str() holds that stack)."""
    return remote_cause(err) is not err
