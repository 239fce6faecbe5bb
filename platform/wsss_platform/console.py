"""What a job prints: one progress line, our own lines, and nothing else unless ``--verbose``.

Ray, Ray Data and Tune print tables, progress bars, hints and known-harmless warnings by default;
a person running ``wsss label`` wants one line that says how far the job is, and the errors.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

VERBOSE_ENV = "WSSS_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Also exported, so that a job's child processes (and a submitted job) follow it."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def quiet_ray() -> None:
    """Silence Ray's own progress output in this (driver) process, unless verbose."""
    if verbose():
        return
    import ray.data  # noqa: F401  (its first import configures its loggers: before the levels are set)

    for name in ("ray", "ray.tune", "ray.train", "ray.air", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Tune's experiment banner and TensorBoard hint come from its "new output" reporter, which
    # prints them whatever the verbosity; the classic reporter at verbose=0 prints nothing.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    logging.getLogger("ray.tune.search.optuna.optuna_search").setLevel(logging.ERROR)  # "Study.stop" on an exhausted space
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    except ImportError:
        pass
    # Ray Data warns that the progress bars it was asked to hide are hidden; its errors still show.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except (ImportError, AttributeError):
        pass


OURS = "[wsss"
"""What our own lines start with, in any process of a job."""


def only_our_worker_lines() -> None:
    """Of what Ray's processes print (forwarded to the driver), show only our own lines, unless verbose.

    Ray offers all or nothing (``log_to_driver``); a training's workers, Train's controller and Ray
    Data's coordinators print deprecation warnings, per-report and per-epoch lines, C++ warnings and,
    when another Ray runs on the machine, tracebacks of Train's placement-group cleaner, each with a
    coloured ``(Actor pid=…)`` prefix. Every line stays in the session's log files; errors reach the
    driver as exceptions. Ray's own handler is swapped for one that passes ``[wsss …]`` lines, bare.
    """
    if verbose():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its own output stays as it is
        return

    def ours(data: dict) -> None:
        lines = [ln for ln in data.get("lines", []) if ln.startswith(OURS)]
        if lines:
            print("\n".join(lines), file=sys.stderr if data.get("is_err") else sys.stdout, flush=True)

    if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("wsss_print_logs", ours)


def quiet_mlflow() -> None:
    """MLflow logs its database migrations and run links at INFO; ours say where the run is."""
    if not verbose():
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # Its own "View run" links open the GenAI view; ours carry workflowType=machine_learning.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per artifact, into pipes too


class Progress:
    """``[wsss label] 40/120 images (33%) · 12.3 img/s · ETA 7s · 1 failed``.

    On a terminal the line is redrawn in place; in a pipe or log file a new line is printed every
    ``every_s`` seconds (and at the end), so a log shows progress too.
    """

    def __init__(self, prefix: str, total: int, unit: str = "images", every_s: float = 5.0, stream=None,
                 start: int = 0, images_per_unit: int = 1) -> None:
        self.prefix, self.total, self.unit = prefix, total, unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = 0.5 if self.tty else every_s
        self.t0 = time.perf_counter()
        self.last = float("-inf")
        self.failed = 0
        self.start = self.done = start
        """Units done before this process began (a resumed training): counted, not in the rate."""
        self.images_per_unit = images_per_unit
        self.note = ""
        """Appended to the line (a training's loss and last val score)."""
        self.shown: tuple[int, int] | None = None

    @property
    def rate(self) -> float:
        """Units per second in this process."""
        elapsed = time.perf_counter() - self.t0
        return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = self.rate
        eta = f" · ETA {max(0.0, (self.total - self.done) / rate):.0f}s" if rate > 0 and self.done < self.total else ""
        failed = f" · {self.failed} failed" if self.failed else ""
        return (f"{self.prefix} {self.done}/{self.total} {self.unit}{pct}{self.note} · {rate * self.images_per_unit:.1f} "
                f"img/s{eta}{failed}")

    def update(self, done: int = 0, failed: int = 0) -> bool:
        """Add ``done`` and ``failed``; returns whether a line was printed."""
        self.done += done
        self.failed += failed
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return False
        self.last = now
        self._print(final=False)
        return True

    def finish(self) -> None:
        """The last line (ended), unless the last one printed already said the same."""
        if self.shown != (self.done, self.failed) or self.tty:
            self._print(final=True)

    def _print(self, final: bool) -> None:
        self.shown = (self.done, self.failed)
        end = "\n" if (final or not self.tty) else ""
        # write(), not print(): in a Ray Train worker print() also goes to Train's logger (shown twice)
        self.stream.write(("\r" if self.tty else "") + self.line() + end)
        self.stream.flush()
