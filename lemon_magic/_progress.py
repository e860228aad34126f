"""The download progress of a pull, in the cell: a widget bar in a notebook, a text line in a
terminal (bytes, rate, time left). Called from the cell's own thread while it waits."""

from __future__ import annotations

import sys
from typing import Any

from lemon_magic._hub import PullProgress

__all__ = ("PullBar", "in_notebook")


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where widgets show)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class PullBar:
    """A progress callback for ``Router.pull``/``load``: call it with each report; ``close()``
    ends the line (text), or replaces the bar with its last line (a notebook keeps that text,
    so a saved notebook shows what happened, not a widget that is gone)."""

    def __init__(self, model: str, *, widget: bool | None = None) -> None:
        self.model = model
        self.widget = in_notebook() if widget is None else widget
        self._bar: Any = None
        self._label: Any = None
        self._handle: Any = None
        self._last: PullProgress | None = None
        self._written = False

    def __call__(self, p: PullProgress) -> None:
        self._last = p
        if self.widget:
            self._show_widget(p)
        else:
            sys.stdout.write(f"\r{self.model}: {p.describe()}\033[K")
            sys.stdout.flush()
            self._written = True

    def _show_widget(self, p: PullProgress) -> None:
        if self._bar is None:
            import ipywidgets
            from IPython.display import display

            self._bar = ipywidgets.FloatProgress(min=0.0, max=1.0, description=self.model[:20],
                                                 layout=ipywidgets.Layout(width="50%"))
            self._label = ipywidgets.Label()
            self._handle = display(ipywidgets.HBox([self._bar, self._label]),  # type: ignore[no-untyped-call]
                                   display_id=True)
        self._bar.value = p.fraction
        self._label.value = p.describe()

    def close(self, *, done: bool = False) -> None:
        """End the display; ``done``: the call succeeded (the download is complete)."""
        if self._handle is not None:
            from IPython.display import Pretty

            last = self._last
            text = (f"{self.model}: downloaded {last.total / 1e6:.0f} MB" if done and last
                    else f"{self.model}: {last.describe() if last else 'no progress'} (not completed)")
            self._handle.update(Pretty(text))  # type: ignore[no-untyped-call]
            self._bar.close()
            self._label.close()
            self._handle = None
        if self._written:
            if done and self._last is not None:
                sys.stdout.write(f"\r{self.model}: downloaded {self._last.total / 1e6:.0f} MB\033[K")
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._written = False
