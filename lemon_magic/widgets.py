"""The panel: live model rows, and a load form that says what Apply will do before it happens.

Threads. Router events arrive on the router's thread, clicks and edits on the
kernel's main thread. Neither writes a widget: both queue work for the one
updater thread that all panels of the process share, the single writer of
every widget a panel computes (rows, banner, buttons, errors), which batches
each update with ``hold_sync``. The panel never decides anything: what Apply
will do comes from ``Router.plan`` (the router's own decision function), and
Apply, Unload and the rows all go through the router.

Lifetime. A panel that is closed or garbage costs nothing: the updater holds
panels by weak reference only; closing or collecting a panel hands its router
subscription to the updater thread to remove (a finalizer never blocks);
``close()`` closes every widget of the panel; and the updater thread exits
once no panel is subscribed. While panels live, it polls ``status()`` once a
second, once per router however many panels there are, and only while some
open panel shows a loading or ready model (elapsed time, uptime, RSS, the
idle-unload countdown).
"""

from __future__ import annotations

import html
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import ipywidgets as w

from lemon_magic._panel_updater import UPDATER as _UPDATER
from lemon_magic._panel_updater import WRITER as _WRITER
from lemon_magic._policy import ModelState
from lemon_magic._records import ModelStatus, Plan, RouterEvent
from lemon_magic._render import duration, remote_options
from lemon_magic.errors import LemonError, NotDownloaded, RouterClosed
from lemon_magic.runtime import Router, get_router

__all__ = ("LemonPanel",)

log = logging.getLogger(__name__)

_CHIP_COLOURS = {"unloaded": "#9e9e9e", "loading": "#1e88e5", "ready": "#43a047",
                 "generating": "#8e24aa", "stopping": "#fb8c00", "crashed": "#e53935",
                 "error": "#e53935", "downloading": "#00897b", "unreachable": "#f4511e"}
_AUTO = "auto"


def chip(status: ModelStatus | None) -> str:
    """The state shown for a model: the router's state, with generating/error spelled out."""
    if status is None:
        return "unloaded"
    if status.download is not None:
        return "downloading"
    if status.state is ModelState.READY and status.requests_in_flight:
        return "generating"
    if status.state is ModelState.FAILED:
        return "error"
    return str(status.state)


def _ago(since: float | None, now: float) -> str:
    if since is None:
        return ""
    s = max(0.0, now - since)
    return f"{s:.1f} s" if s < 60 else f"{s / 60:.0f} min"


def _widget_tree(*roots: w.Widget) -> Iterator[w.Widget]:
    """Every widget reachable from ``roots`` through synced traits (children, layout, style...)."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        widget = stack.pop()
        if id(widget) in seen:
            continue
        seen.add(id(widget))
        yield widget
        for key in widget.keys:
            value = getattr(widget, key, None)
            if isinstance(value, w.Widget):
                stack.append(value)
            elif isinstance(value, (list, tuple)):
                stack.extend(v for v in value if isinstance(v, w.Widget))




class _Row:
    """The widgets of one model's row (written only by the updater thread)."""

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

    def show(self, s: ModelStatus, now: float) -> None:
        """Show ``s``; ``now`` is the wall-clock time that elapsed times and countdowns count from."""
        self.status = s
        state = chip(s)
        colour = _CHIP_COLOURS.get(state, "#9e9e9e")
        opts = s.options
        options = (f"ctx {opts.ctx_size}, threads {opts.threads}"
                   + (f", {' '.join(opts.extra_args)}" if opts.extra_args else "")) if opts else ""
        port = s.url.rsplit(":", 1)[1] if s.url else ""
        where = f"pid {s.pid}:{port}" if s.pid else ""
        if s.remote is not None:  # the remote's own report; no local process or memory
            options = remote_options(s.remote.options)
            where = f"on {s.remote.url}" + (f", pid {s.pid}" if s.pid else "")
        when = {"ready": f"up {_ago(s.since, now)}", "generating": f"up {_ago(s.since, now)}",
                "loading": f"loading for {_ago(s.since, now)}"}.get(state, "")
        idle = ("" if s.idle_unload_at is None
                else f"unloads if idle in {duration(s.idle_unload_at - now)}")
        if s.download is not None:  # e.g. "downloading 34 % (120/350 MB), 2.1 MB/s, 0:19 left"
            when = s.download.removeprefix("downloading ")
        cells = [f"<b>{html.escape(s.name)}</b>",
                 f"<span style='background:{colour};color:white;border-radius:8px;"
                 f"padding:1px 8px'>{state}</span>",
                 html.escape(s.backend or ""), html.escape(where),
                 f"{s.rss / 2**20:.0f} MiB" if s.rss else "", html.escape(options), when, idle,
                 f"last load {s.load_seconds:.2f} s" if s.load_seconds else ""]
        self.summary.value = " &nbsp; ".join(c for c in cells if c)
        if state == "loading" and s.load_seconds and s.since is not None:
            self.progress.layout.visibility = "visible"
            self.progress.value = min(0.95, (now - s.since) / max(s.load_seconds, 0.01))
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
    ``close()`` it when done (a panel that is closed or garbage costs nothing).
    """

    def __init__(self, router: Router | None = None) -> None:
        self.router = router or get_router()
        if self.router.closed:
            raise RouterClosed()
        self._closed = False
        self._rows: dict[str, _Row] = {}
        self._pending = 0  # updates queued for this panel (guarded by the updater)
        self._moving = False  # a row shows a loading or ready model: the updater polls
        self._busy = False  # an Apply/Unload started here is in flight
        self.plan: Plan | None = None
        #: what the last Apply or Unload returned (``None`` if it failed)
        self.last_result: Any = None
        self.error_text = ""
        #: why the form's options are not valid ("" when they are)
        self.form_problem = ""
        # The user's form edits: {field: (edit number, value)}, kept until a prefill asked
        # for after them (Revert, a model pick, a load of the model) gives them up.
        self._edit_lock = threading.Lock()
        self._edit_count = 0
        self._user_edits: dict[str, tuple[int, str]] = {}

        self.header = w.HTML("<b>lemon_magic</b>")
        self.rows_box = w.VBox()
        names = self.router.model_names()
        self.model = w.Dropdown(options=names, value=names[0], description="model")
        self.ctx_size = w.Text(value=_AUTO, description="ctx size")
        self.threads = w.Text(value=_AUTO, description="threads")
        self.extra_args = w.Text(value="", description="extra args", placeholder="--flag value")
        self.backend = w.Dropdown(options=[_AUTO, *self.router.backend_names()],
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

        self._fields: dict[str, w.ValueWidget] = {
            "ctx_size": self.ctx_size, "threads": self.threads, "extra_args": self.extra_args,
            "backend": self.backend}
        for field in self._fields.values():
            field.observe(self._on_edit, names="value")
        self.model.observe(self._on_model_change, names="value")
        self.apply.on_click(lambda _: self._post(LemonPanel._apply, self.form_options()))
        self.revert.on_click(lambda _: self._post(LemonPanel._prefill, self._edits_so_far()))
        self.unload.on_click(lambda _: self._post(LemonPanel._unload, self.model.value))

        try:
            subscription = _UPDATER.attach(self)
        except BaseException:
            self._close_widgets()
            raise
        # closing or collecting the panel ends its subscription (at exit the router goes anyway)
        self._finalizer = weakref.finalize(self, _UPDATER.detach, subscription)
        self._finalizer.atexit = False
        self._post(LemonPanel._refresh_rows)
        self._post(LemonPanel._prefill, 0)

    # ----------------------------------------------------------------- lifetime

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def close(self) -> None:
        """Stop listening to the router and close the panel with every widget in it.

        Idempotent, and safe from a finalizer (ipywidgets calls ``close`` from ``__del__``):
        the unsubscribe itself is left to the updater thread.
        """
        self._closed = True
        finalizer = getattr(self, "_finalizer", None)  # None if __init__ failed early
        if finalizer is not None:
            finalizer()
        self._close_widgets()

    def _close_widgets(self) -> None:
        rows = [row.box for row in getattr(self, "_rows", {}).values()]
        for widget in list(_widget_tree(self, *rows)):
            w.Widget.close(widget)

    # ----------------------------------------------------------------- the updater thread

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Queue ``fn(self, *args)`` for the updater thread."""
        _UPDATER.post(self, fn, args)

    def _update(self, fn: Callable[..., None], *args: Any) -> None:
        """Run one update (on the updater thread), as one ``hold_sync`` batch."""
        try:
            with self.hold_sync():
                fn(self, *args)
        except Exception as exc:  # a panel bug must not kill the writer thread
            self.error.value = f"<span style='color:#e53935'>panel error: {html.escape(repr(exc))}</span>"

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until every queued update has been applied (for tests and notebooks)."""
        if _WRITER.active:
            raise RuntimeError("wait_idle() on the panels' updater thread would wait for itself")
        if not _UPDATER.wait_idle(self, timeout):
            raise TimeoutError("the panel did not catch up")

    def wait_until(self, predicate: Callable[[LemonPanel], bool], timeout: float = 60.0) -> None:
        """Block until ``predicate(panel)`` holds after the queued updates (tests, notebooks)."""
        deadline = time.monotonic() + timeout
        while True:
            self.wait_idle(max(0.1, deadline - time.monotonic()))
            if predicate(self):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the panel never got there: {self!r}")
            _UPDATER.wait_update(0.05)

    # ----------------------------------------------------------------- user input (any thread)

    def _edits_so_far(self) -> int:
        with self._edit_lock:
            return self._edit_count

    @property
    def _edited(self) -> bool:
        """The form holds edits that no prefill has given up since."""
        with self._edit_lock:
            return bool(self._user_edits)

    def _on_model_change(self, _change: object) -> None:
        # the updater's own option refresh is ignored; a user's pick never is
        if not _WRITER.active:
            self._post(LemonPanel._prefill, self._edits_so_far())

    def _on_edit(self, change: dict[str, Any]) -> None:
        if _WRITER.active:
            return  # the panel's own write (a prefill), not the user's
        name = next(n for n, field in self._fields.items() if field is change["owner"])
        with self._edit_lock:
            self._edit_count += 1
            self._user_edits[name] = (self._edit_count, change["new"])
        self._post(LemonPanel._keep_edits)

    # ----------------------------------------------------------------- updates (updater thread)

    def _on_event(self, event: RouterEvent) -> None:
        self._refresh_rows()
        if event.model == self.model.value:
            if event.new is ModelState.READY and event.old is not ModelState.READY and not self._edited:
                self._prefill(self._edits_so_far())  # show what is now loaded, unless the user edits
            else:
                self._refresh_banner()

    def _refresh_rows(self) -> None:
        statuses = self.router.status()
        self._show_rows(statuses)
        names = sorted({*self.router.model_names(), *(s.name for s in statuses)})
        if list(self.model.options) != names:
            selected = self.model.value
            self.model.options = names  # ipywidgets resets the value to the first option
            self.model.value = selected if selected in names else names[0]
            if selected not in names:
                self._prefill(self._edits_so_far())

    def _show_rows(self, statuses: list[ModelStatus]) -> None:
        now = time.time()
        for s in statuses:
            row = self._rows.get(s.name)
            if row is None:
                row = self._rows[s.name] = _Row(s.name)
                self.rows_box.children = [*self.rows_box.children, row.box]
            row.show(s, now)
        running = sum(1 for s in statuses if s.state in (ModelState.READY, ModelState.UNREACHABLE))
        serving = self.router.serving
        where = "" if serving is None else (f" — serving {html.escape(serving.base_url)} "
                                            f"({serving.requests_served} request"
                                            f"{'' if serving.requests_served == 1 else 's'})")
        self.header.value = f"<b>lemon_magic</b> — {len(statuses)} model(s), {running} running{where}"
        self._moving = any(s.state in (ModelState.LOADING, ModelState.READY) for s in statuses)

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
        except NotDownloaded as exc:  # loadable: Apply pulls it first
            self.plan = None
            self.form_problem = ""
            self.banner.value = f"<span style='color:#00897b'>{html.escape(exc.message)}</span>"
            return
        except LemonError as exc:
            self.plan = None
            self.form_problem = exc.message
            self.banner.value = f"<span style='color:#e53935'>{html.escape(exc.message)}</span>"
            self.apply.disabled = True
            return
        self.form_problem = ""
        colour = {"noop": "#43a047", "load": "#1e88e5", "reload": "#fb8c00"}.get(self.plan.action, "#555")
        self.banner.value = f"<span style='color:{colour}'>{html.escape(self.plan.describe())}</span>"

    def _prefill(self, asked: int) -> None:
        """Show the selected model's loaded options (or ``auto``) in the form.

        ``asked`` is the number of user edits made when this prefill was asked for: those
        give way to it, later ones (even one made while it runs) are kept.
        """
        status = self._status(self.model.value)
        opts = status.options if status and status.state is ModelState.READY else None
        values = {"ctx_size": str(opts.ctx_size) if opts else _AUTO,
                  "threads": str(opts.threads) if opts else _AUTO,
                  "extra_args": " ".join(opts.extra_args) if opts else "",
                  "backend": opts.backend if opts and opts.backend in self.backend.options else _AUTO}
        if status and status.remote is not None and status.state is ModelState.READY:
            reported = status.remote.options  # what its server runs (the rest is the server's)
            ctx = reported.get("ctx_size")
            values.update(ctx_size=str(ctx) if isinstance(ctx, int) else _AUTO,
                          extra_args=str(reported.get("llamacpp_args") or ""))
        with self._edit_lock:
            self._user_edits = {n: e for n, e in self._user_edits.items() if e[0] > asked}
        for name, value in values.items():
            with self._edit_lock:
                if name in self._user_edits:
                    continue  # edited after the prefill was asked for
            self._fields[name].value = value
        self._keep_edits()

    def _keep_edits(self) -> None:
        """Put back a user's edit that a prefill overwrote as it landed, then refresh the banner."""
        with self._edit_lock:
            edits = {name: value for name, (_, value) in self._user_edits.items()}
        for name, value in edits.items():
            if self._fields[name].value != value:
                self._fields[name].value = value
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
        future.add_done_callback(lambda f: self._post(LemonPanel._done, f))

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
