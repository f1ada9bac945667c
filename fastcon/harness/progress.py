"""Progress that suits where the output goes.

On a terminal: tqdm bars that redraw in place. Into a file or a pipe (``fastcon compare >
log``, a CI job) a bar would write one line per redraw, thousands per run; there each stage
prints one line per epoch instead (:meth:`Progress.line`), and the bars nothing.
"""

from __future__ import annotations

import sys


def interactive() -> bool:
    """Whether bars can redraw in place: stdout (log lines) and stderr (bars) are both terminals."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class Progress:
    """A tqdm bar on a terminal; elsewhere only the lines passed to :meth:`line` and :meth:`close`."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, unit: str = "it"):
        self.desc = desc
        self.enabled = enabled
        self.bar = None
        if enabled and interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)

    def line(self, text: str) -> None:
        """A line of progress for logs (shown by the bar itself on a terminal)."""
        if self.enabled and self.bar is None:
            print(f"{self.desc}: {text}", flush=True)

    def close(self, summary: str = "") -> None:
        if self.bar is not None:
            self.bar.close()
        elif summary:
            self.line(summary)
