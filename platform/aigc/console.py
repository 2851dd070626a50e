"""What a person watches: one live line per stage, drawn by the driver, and whether Ray's own output joins it.

On a terminal each stage is a rich progress bar that updates in place; when stdout is a file or a pipe (CI, a
test, ``| tee``) it prints a few plain lines instead (at a quarter, half, three quarters and the end), so a log
stays short. Ray's worker and library output goes to the Ray session's log files unless ``verbose`` is on
(``AIGC_VERBOSE=1``, or ``init_ray(verbose=True)``): see :mod:`aigc.cluster.connect`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

__all__ = ["VERBOSE_ENV", "StageLine", "interactive", "verbose"]

VERBOSE_ENV = "AIGC_VERBOSE"
_PLAIN_MARKS = (0.25, 0.5, 0.75, 1.0)  # fractions of a stage at which a plain (non-terminal) line is printed
_PLAIN_EVERY_S = 60.0  # a stage of unknown length prints a plain line at most this often


def verbose() -> bool:
    """Whether ``AIGC_VERBOSE`` asks for Ray's worker and library output on the console (``1``/``true``/``yes``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def interactive() -> bool:
    """Whether stdout is a terminal, where a line can be redrawn in place."""
    return sys.stdout.isatty()


class StageLine:
    """One stage's progress: a live bar on a terminal, a handful of plain lines otherwise.

    ``update`` moves the bar and replaces its text; ``log`` prints a line that stays (above the bar). Use it as
    a context manager: the bar is drawn on entry and left in its last state on exit.

    Args:
        stage: the prefix of every line (``train`` -> ``[train] ...``).
        total: units of work (steps, trials); None until the first ``update`` that gives it.
        live: draw a live bar (default: when stdout is a terminal).
        console: the ``rich.console.Console`` the live bar draws on (default: stdout).
    """

    def __init__(self, stage: str, total: int | None = None, live: bool | None = None, console: Any = None) -> None:
        self.stage, self.total = stage, total
        self.live = interactive() if live is None else live
        self._console = console
        self._done, self._text = 0, ""
        self._marks = list(_PLAIN_MARKS)
        self._last_plain = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> StageLine:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn(f"[bold][{self.stage}][/bold]"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}", markup=False),
                console=self._console,
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def update(
        self, done: int | None = None, total: int | None = None, text: str | None = None, plain: bool = True
    ) -> None:
        """Move to ``done`` of ``total`` units and show ``text`` (each left as it was when None).

        ``plain=False``: never print a plain line for this update (a ``log`` line has just said the same).
        """
        self.total = total if total is not None else self.total
        self._done = done if done is not None else self._done
        self._text = text if text is not None else self._text
        if self._bar is not None:
            self._bar.update(self._task, completed=self._done, total=self.total, description=self._text)
            return
        if self._plain_due() and plain:
            print(f"[{self.stage}] {self._text}", flush=True)

    def log(self, line: str) -> None:
        """A line that stays on screen: ``[stage] line``."""
        text = f"[{self.stage}] {line}"
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def _plain_due(self) -> bool:
        """Whether a plain line is due: the next quarter of ``total`` reached (or, unknown total, a minute passed)."""
        if not self.total:
            if time.monotonic() - self._last_plain < _PLAIN_EVERY_S:
                return False
            self._last_plain = time.monotonic()
            return True
        passed = [m for m in self._marks if self._done >= m * self.total]
        if not passed:
            return False
        self._marks = [m for m in self._marks if m not in passed]
        return True
