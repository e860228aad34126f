"""The panel: live model rows, and a load form that says what Apply will do before it happens.

Threads. Router events arrive on the router's thread, clicks and edits on the
kernel's main thread. Neither writes a widget: both queue work for the
panel's own thread, the single writer of every widget the panel computes
(rows, banner, buttons, errors), which batches each update with
``hold_sync``. The panel never decides anything: what Apply will do comes from
``Router.plan`` (the router's own decision function), and Apply, Unload and
the rows all go through the router.
"""

from __future__ import annotations

import html
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import ipywidgets as w

from lemon_magic._policy import ModelState
from lemon_magic.errors import LemonError
from lemon_magic.router import ModelStatus, Plan, RouterEvent
from lemon_magic.runtime import Router, get_router

__all__ = ("LemonPanel",)

_CHIP_COLOURS = {"unloaded": "#9e9e9e", "loading": "#1e88e5", "ready": "#43a047",
                 "generating": "#8e24aa", "stopping": "#fb8c00", "crashed": "#e53935",
                 "error": "#e53935"}
_AUTO = "auto"


def chip(status: ModelStatus | None) -> str:
    """The state shown for a model: the router's state, with generating/error spelled out."""
    if status is None:
        return "unloaded"
    if status.state is ModelState.READY and status.requests_in_flight:
        return "generating"
    if status.state is ModelState.FAILED:
        return "error"
    return str(status.state)


def _ago(since: float | None) -> str:
    if since is None:
        return ""
    s = max(0.0, time.time() - since)
    return f"{s:.1f} s" if s < 60 else f"{s / 60:.0f} min"


class _Row:
    """The widgets of one model's row (written only by the panel thread)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.summary = w.HTML()
        self.progress = w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="120px",
                                                                             visibility="hidden"))
        self.details = w.HTML()
        self.error = w.Accordion(children=[self.details], layout=w.Layout(display="none"))
        self.error.set_title(0, "last error")
        self.box = w.VBox([w.HBox([self.summary, self.progress]), self.error])
        self.status: ModelStatus | None = None

    def show(self, s: ModelStatus) -> None:
        self.status = s
        state = chip(s)
        colour = _CHIP_COLOURS.get(state, "#9e9e9e")
        opts = s.options
        options = (f"ctx {opts.ctx_size}, threads {opts.threads}"
                   + (f", {' '.join(opts.extra_args)}" if opts.extra_args else "")) if opts else ""
        port = s.url.rsplit(":", 1)[1] if s.url else ""
        when = {"ready": f"up {_ago(s.since)}", "generating": f"up {_ago(s.since)}",
                "loading": f"loading for {_ago(s.since)}"}.get(state, "")
        cells = [f"<b>{html.escape(s.name)}</b>",
                 f"<span style='background:{colour};color:white;border-radius:8px;"
                 f"padding:1px 8px'>{state}</span>",
                 html.escape(s.backend or ""), f"pid {s.pid}:{port}" if s.pid else "",
                 f"{s.rss / 2**20:.0f} MiB" if s.rss else "", html.escape(options), when,
                 f"last load {s.load_seconds:.2f} s" if s.load_seconds else ""]
        self.summary.value = " &nbsp; ".join(c for c in cells if c)
        if state == "loading" and s.load_seconds and s.since is not None:
            self.progress.layout.visibility = "visible"
            self.progress.value = min(0.95, (time.time() - s.since) / max(s.load_seconds, 0.01))
        else:
            self.progress.layout.visibility = "hidden"
        if s.last_error:
            tail = "\n".join(s.log_tail[-15:])
            self.details.value = (f"<pre>{html.escape(s.last_error)}</pre>"
                                  + (f"<pre>{html.escape(tail)}</pre>" if tail else ""))
            self.error.layout.display = ""
        else:
            self.error.layout.display = "none"


class LemonPanel(w.VBox):
    """One panel per kernel: a row per model, and a load form with a warning banner.

    ``%lemon_panel`` shows the kernel's panel; ``LemonPanel()`` makes another.
    """

    def __init__(self, router: Router | None = None) -> None:
        self.router = router or get_router()
        self._rows: dict[str, _Row] = {}
        self._queue: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.Queue()
        self._busy = False  # an Apply/Unload started here is in flight
        self.plan: Plan | None = None
        #: what the last Apply or Unload returned (``None`` if it failed)
        self.last_result: Any = None
        self.error_text = ""
        #: why the form's options are not valid ("" when they are)
        self.form_problem = ""

        self.header = w.HTML("<b>lemon_magic</b>")
        self.rows_box = w.VBox()
        names = self.router.async_router.registry.names()
        self.model = w.Dropdown(options=names, value=names[0], description="model")
        self.ctx_size = w.Text(value=_AUTO, description="ctx size")
        self.threads = w.Text(value=_AUTO, description="threads")
        self.extra_args = w.Text(value="", description="extra args", placeholder="--flag value")
        self.backend = w.Dropdown(options=[_AUTO, *self.router.async_router.backends],
                                  value=_AUTO, description="backend")
        self.banner = w.HTML()
        self.apply = w.Button(description="Apply", button_style="primary")
        self.revert = w.Button(description="Revert")
        self.unload = w.Button(description="Unload", button_style="warning")
        self.error = w.HTML()
        form = w.VBox([w.HBox([self.model, self.backend]), w.HBox([self.ctx_size, self.threads]),
                       self.extra_args, self.banner, w.HBox([self.apply, self.revert, self.unload]),
                       self.error])
        super().__init__([self.header, self.rows_box, form])

        self._edited = False  # the user changed the form since it was last prefilled
        self._prefilling = False
        for field in (self.ctx_size, self.threads, self.extra_args, self.backend):
            field.observe(self._on_edit, names="value")
        self._keep_model = False
        self.model.observe(self._on_model_change, names="value")
        self.apply.on_click(lambda _: self._post(self._apply, self.form_options()))
        self.revert.on_click(lambda _: self._post(self._prefill))
        self.unload.on_click(lambda _: self._post(self._unload, self.model.value))

        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="lemon-panel", daemon=True)
        self._thread.start()
        self._unsubscribe = self.router.subscribe(lambda e: self._post(self._on_event, e))
        self._post(self._refresh_rows)
        self._post(self._prefill)

    # ----------------------------------------------------------------- the writer thread

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        self._queue.put((fn, args))

    def _run(self) -> None:
        while not self._stopped:
            try:
                fn, args = self._queue.get(timeout=1.0)
            except queue.Empty:
                if any(r.status and r.status.state in (ModelState.LOADING, ModelState.READY)
                       for r in self._rows.values()):
                    self._guarded(self._refresh_rows)  # uptime, elapsed, RSS: once a second
                continue
            self._guarded(fn, *args)
            self._queue.task_done()

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            with self.hold_sync():
                fn(*args)
        except Exception as exc:  # a panel bug must not kill the writer thread
            self.error.value = f"<span style='color:#e53935'>panel error: {html.escape(repr(exc))}</span>"

    def wait_until(self, predicate: Callable[[LemonPanel], bool], timeout: float = 60.0) -> None:
        """Block until ``predicate(panel)`` holds after the queued updates (tests, notebooks)."""
        deadline = time.monotonic() + timeout
        while True:
            self.wait_idle(max(0.1, deadline - time.monotonic()))
            if predicate(self):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the panel never got there: {self!r}")
            time.sleep(0.01)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until every queued update has been applied (for tests and notebooks)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                raise TimeoutError("the panel did not catch up")
            time.sleep(0.005)

    def close(self) -> None:
        """Stop listening to the router, stop the panel thread, close the widgets."""
        self._unsubscribe()
        self._stopped = True
        self._post(lambda: None)  # wake the thread so it sees the flag
        super().close()

    # ----------------------------------------------------------------- updates (panel thread)

    def _by_panel(self) -> bool:
        thread = getattr(self, "_thread", None)
        return thread is not None and threading.get_ident() == thread.ident

    def _on_model_change(self, _change: object) -> None:
        # only the panel thread's own option refresh is ignored; a user's pick never is
        if not (self._keep_model and self._by_panel()):
            self._post(self._prefill)

    def _on_edit(self, _change: object) -> None:
        if not (self._prefilling and self._by_panel()):  # the user typed, even mid-prefill
            self._edited = True
        self._post(self._refresh_banner)

    def _on_event(self, event: RouterEvent) -> None:
        self._refresh_rows()
        if event.model == self.model.value:
            if event.new is ModelState.READY and event.old is not ModelState.READY and not self._edited:
                self._prefill()  # show what is now loaded, unless the user is editing
            else:
                self._refresh_banner()

    def _refresh_rows(self) -> None:
        statuses = self.router.status()
        for s in statuses:
            row = self._rows.get(s.name)
            if row is None:
                row = self._rows[s.name] = _Row(s.name)
                self.rows_box.children = [*self.rows_box.children, row.box]
            row.show(s)
        running = sum(1 for s in statuses if s.pid)
        self.header.value = f"<b>lemon_magic</b> — {len(statuses)} model(s), {running} running"
        names = sorted({*self.router.async_router.registry.names(), *(s.name for s in statuses)})
        if list(self.model.options) != names:
            selected = self.model.value
            self._keep_model = True  # ipywidgets resets the value to the first option
            try:
                self.model.options = names
                self.model.value = selected if selected in names else names[0]
            finally:
                self._keep_model = False

    def _status(self, model: str) -> ModelStatus | None:
        return next((s for s in self.router.status() if s.name == model), None)

    def form_options(self) -> dict[str, Any]:
        """The load options the form asks for (``auto`` fields left out)."""
        options: dict[str, Any] = {}
        for name, field in (("ctx_size", self.ctx_size), ("threads", self.threads)):
            value = field.value.strip()
            if value and value != _AUTO:
                options[name] = value
        if self.extra_args.value.strip():
            options["extra_args"] = self.extra_args.value
        if self.backend.value != _AUTO:
            options["backend"] = self.backend.value
        return options

    def _refresh_banner(self) -> None:
        status = self._status(self.model.value)
        transition = status is not None and status.state in (ModelState.LOADING, ModelState.STOPPING)
        for button in (self.apply, self.revert, self.unload):
            button.disabled = transition or self._busy
        try:
            self.plan = self.router.plan(self.model.value, **self.form_options())
        except LemonError as exc:
            self.plan = None
            self.form_problem = exc.message
            self.banner.value = f"<span style='color:#e53935'>{html.escape(exc.message)}</span>"
            self.apply.disabled = True
            return
        self.form_problem = ""
        colour = {"noop": "#43a047", "load": "#1e88e5", "reload": "#fb8c00"}.get(self.plan.action, "#555")
        self.banner.value = f"<span style='color:{colour}'>{html.escape(self.plan.describe())}</span>"

    def _prefill(self) -> None:
        status = self._status(self.model.value)
        opts = status.options if status and status.state is ModelState.READY else None
        self._prefilling = True
        try:
            self.ctx_size.value = str(opts.ctx_size) if opts else _AUTO
            self.threads.value = str(opts.threads) if opts else _AUTO
            self.extra_args.value = " ".join(opts.extra_args) if opts else ""
            self.backend.value = opts.backend if opts and opts.backend in self.backend.options else _AUTO
        finally:
            self._prefilling = False
        self._edited = False
        self._refresh_banner()

    def _apply(self, options: dict[str, Any]) -> None:
        if self._busy:  # a second click queued before the first disabled the button
            return
        self._start(self.router.load_soon, self.model.value, **options)

    def _unload(self, model: str) -> None:
        if self._busy:
            return
        self._start(self.router.unload_soon, model)

    def _start(self, action: Callable[..., Future[Any]], *args: Any, **kwargs: Any) -> None:
        self.error.value = ""
        self.error_text = ""
        try:
            future = action(*args, **kwargs)
        except LemonError as exc:
            self._show_error(exc)
            return
        self._busy = True
        self._refresh_banner()
        future.add_done_callback(lambda f: self._post(self._done, f))

    def _done(self, future: Future[Any]) -> None:
        self._busy = False
        exc = None if future.cancelled() else future.exception()
        self.last_result = None if exc is not None or future.cancelled() else future.result()
        if exc is not None:
            self._show_error(exc)
        self._refresh_rows()
        self._refresh_banner()

    def _show_error(self, exc: BaseException) -> None:
        text = exc.render() if isinstance(exc, LemonError) else repr(exc)
        self.error_text = text.splitlines()[0]
        self.error.value = f"<pre style='color:#e53935'>{html.escape(text)}</pre>"

    # ----------------------------------------------------------------- text form

    def __repr__(self) -> str:
        """A stable text form: states and options, no pids, times or memory."""
        lines = ["LemonPanel"]
        for row in self._rows.values():
            s = row.status
            if s is None:
                continue
            opts = f" ({s.backend}, ctx {s.options.ctx_size})" if s.options else ""
            lines.append(f"  {s.name}: {chip(s)}{opts}")
        if self.plan is not None:
            what = {"noop": "no change (no-op)", "load": f"will load {self.plan.model}",
                    "wait": f"{self.plan.model} is loading"}.get(self.plan.action)
            if what is None and self.plan.current is not None:
                what = (f"will reload {self.plan.model}: "
                        f"{self.plan.current.describe_diff(self.plan.options)}")
            lines.append(f"  form: {what}")
        elif self.form_problem:
            lines.append(f"  form: not valid: {self.form_problem}")
        if self.error_text:
            lines.append(f"  error: {self.error_text}")
        return "\n".join(lines)
