"""Failures a restarted worker group would meet again: not retried, and reported as their own one line.

``FailureConfig(max_failures)`` restarts the worker group from the last checkpoint on any worker error,
which is right for a lost node or a killed worker and wrong for a damaged input file, a setting that
cannot work or a diverged loss: each restart fails the same way, minutes later and hundreds of log
lines longer. Train has no per-exception retry policy, so a controller callback raises on such an
error; an error raised in the controller is one Train does not retry.
"""

from __future__ import annotations

from collections.abc import Iterator

from ray.train import UserCallback

from wsss_platform.checkpoint import DamagedCheckpoint
from wsss_platform.config import ConfigError
from wsss_platform.datasets.base import DatasetError

PERMANENT: tuple[type[BaseException], ...] = (DatasetError, DamagedCheckpoint, ConfigError, FloatingPointError)
"""A damaged or missing input (named), a checkpoint that does not load, a setting that cannot work, a
loss that diverged."""


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception it wraps: causes, Train's worker and controller wrappers, Ray's task errors."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack += [x.__cause__, x.__context__, getattr(x, "controller_failure", None), getattr(x, "cause", None),
                  getattr(x, "_base_exc", None), *getattr(x, "worker_failures", {}).values()]


def _from_text(text: str) -> BaseException | None:
    """The last permanent error named in a traceback's text. Ray Data hands a loader's error to the
    training worker as text only (its exception object stays in the loader's process)."""
    names = {(c.__name__ if c.__module__ == "builtins" else f"{c.__module__}.{c.__qualname__}") + ": ": c
             for c in PERMANENT}
    found = [(names[n], line[len(n):]) for line in text.splitlines() for n in names if line.startswith(n)]
    return found[-1][0](found[-1][1]) if found else None


def permanent_cause(e: BaseException) -> BaseException | None:
    """The permanent error inside ``e``, or None when a retry could help."""
    for x in _chain(e):
        if isinstance(x, PERMANENT):
            return x
        if (named := _from_text(str(x))) is not None:
            return named
    return None


class PermanentFailure(RuntimeError):
    """Raised in Train's controller so that the run ends at once (a controller error is not retried)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause

    def __reduce__(self):
        return (type(self), (self.cause,))


class StopOnPermanentError(UserCallback):
    """Ends the run on the first worker error that :func:`permanent_cause` recognises."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            cause = permanent_cause(error)
            if cause is not None:
                raise PermanentFailure(cause)
