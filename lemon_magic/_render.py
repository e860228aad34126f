"""Tables the magics return: plain text for terminals and nbval, HTML for notebooks."""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lemon_magic._records import LoadResult, ModelEntry, ModelStatus, PullResult, UnloadResult
from lemon_magic._templates import template_label

if TYPE_CHECKING:
    from lemon_magic.server.serve import ServingInfo

__all__ = ("ModelsTable", "StatusTable", "describe_load", "describe_unload", "duration", "load_note",
           "remote_options", "seconds", "serving_line")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([line, *body])


def _html(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _options(s: ModelStatus) -> str:
    if s.remote is not None:
        return remote_options(s.remote.options)
    if s.options is None:
        return ""
    parts = [f"ctx {s.options.ctx_size}", f"threads {s.options.threads}"]
    if s.options.chat_template:
        parts.append(f"template {template_label(s.options.chat_template)}")
    if s.options.extra_args:
        parts.append(" ".join(s.options.extra_args))
    return ", ".join(parts)


def remote_options(reported: Mapping[str, Any]) -> str:
    """A remote's report as the options column shows it (``ctx 16384, cpu, --flash-attn on``)."""
    parts = [f"ctx {reported['ctx_size']}"] if reported.get("ctx_size") else []
    parts += [f"device {reported['llamacpp_backend']}"] if reported.get("llamacpp_backend") else []
    parts += [str(reported["llamacpp_args"])] if reported.get("llamacpp_args") else []
    return ", ".join(parts)


def _state(s: ModelStatus) -> str:
    if s.download:
        return s.download
    state = str(s.state) + (" (pinned)" if s.pinned else "") + _idle_note(s)
    if s.remote is not None:  # the remote's own word, when it says more than ready
        said = s.remote.status not in (None, "ready", "loaded", str(s.state))
        word = ("it loads it on the first request" if s.remote.api == "openai"
                and s.remote.status == "unloaded" else f"it says {s.remote.status}")
        state += f" ({s.remote.url}{', ' + word if said else ''})"
    return state


def duration(seconds: float) -> str:
    """``"4 min 10 s"``-style text of a time left (the panel and ``%lemon_status`` share it)."""
    left = max(0, round(seconds))
    return f"{left // 60} min {left % 60} s" if left >= 60 else f"{left} s"


def _idle_note(s: ModelStatus) -> str:
    """``" (unloads if idle in 4 min 10 s)"`` while the idle timer runs, else nothing."""
    if s.idle_unload_at is None:
        return ""
    return f" (unloads if idle in {duration(s.idle_unload_at - time.time())})"


def serving_line(info: ServingInfo) -> str:
    """``serving http://127.0.0.1:13305/api/v1 — 12 requests``: the line above the status table."""
    n = info.requests_served
    return f"serving {info.base_url} — {n} request{'' if n == 1 else 's'}"


class StatusTable:
    """What ``%lemon_status`` shows: one row per model the router knows."""

    headers = ("model", "state", "backend", "pid", "options", "memory", "last load", "last error")

    def __init__(self, statuses: Sequence[ModelStatus], serving: ServingInfo | None = None) -> None:
        self.statuses = list(statuses)
        self.serving = serving

    def rows(self) -> list[list[str]]:
        return [[s.name, _state(s), s.backend or "",
                 str(s.pid or ""), _options(s), f"{s.rss / 2**20:.0f} MiB" if s.rss else "",
                 f"{s.load_seconds:.2f} s" if s.load_seconds else "",
                 (s.last_error or "").splitlines()[0] if s.last_error else ""]
                for s in self.statuses]

    def __repr__(self) -> str:
        table = _table(self.headers, self.rows()) if self.statuses else "no models loaded yet"
        return table if self.serving is None else serving_line(self.serving) + "\n" + table

    def _repr_html_(self) -> str:
        table = _html(self.headers, self.rows()) if self.statuses else "<i>no models loaded yet</i>"
        if self.serving is None:
            return table
        return f"<p>{html.escape(serving_line(self.serving))}</p>{table}"


class ModelsTable:
    """What ``%lemon_models`` shows: every built-in, registered or used model and its state."""

    headers = ("model", "source", "kind", "state", "file")

    def __init__(self, entries: Sequence[ModelEntry]) -> None:
        self.entries = list(entries)
        self.rows_ = [[e.name, e.source, e.kind, str(e.state), _where(e)] for e in entries]

    def __repr__(self) -> str:
        return _table(self.headers, self.rows_)

    def _repr_html_(self) -> str:
        return _html(self.headers, self.rows_)


def _where(e: ModelEntry) -> str:
    if e.problem:
        return f"({e.problem})"
    if e.source == "catalog":
        size = f", about {e.size / 1e6:.0f} MB" if e.size else ""
        return f"{e.checkpoint} (not downloaded{size}: the first load pulls it)"
    pulled = f"{e.checkpoint}: " if e.checkpoint else ""
    size = f" ({e.size / 1e6:.0f} MB)" if e.size else ""
    return pulled + e.path + (size if e.present else " (not on disk yet)")


def describe_pull(r: PullResult) -> str:
    """One line for what a pull did, as ``%lemon_pull`` prints it."""
    name = "" if r.model == r.checkpoint else f" as {r.model}"
    if not r.checkpoint:
        return f"{r.model} is a local model ({r.size / 1e6:.0f} MB): nothing to pull"
    if not r.downloaded:
        return f"{r.checkpoint} is in the cache ({r.size / 1e6:.0f} MB): registered{name}"
    joined = "; joined a pull already in flight" if r.joined else ""
    return (f"pulled {r.checkpoint}{name} ({r.downloaded / 1e6:.0f} MB downloaded in "
            f"{seconds(r.seconds)}{joined})")


def seconds(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 0.1 else f"{s:.1f} s"


def describe_load(r: LoadResult) -> str:
    """One line for what a load did, as ``%lemon_load`` prints it (and which models it
    stopped to make room: ``; evicted tiny (pid 4242) to make room``)."""
    line = _describe_load(r)
    if r.evicted:
        gone = ", ".join(f"{name} (pid {pid})" if pid else f"{name} (its load cancelled)"
                         for name, pid in r.evicted.items())
        line += f"; evicted {gone} to make room"
    return line


def _describe_load(r: LoadResult) -> str:
    if r.remote is not None and (r.action != "noop" or r.backend.startswith("openai")):
        return _describe_remote_load(r)
    if r.action == "noop":
        where = f" on {r.remote}" if r.remote else ""
        return f"already loaded with these options{where} (no-op, {seconds(r.seconds)})"
    where = f"{r.backend}, pid {r.pid}, ctx {r.options.ctx_size}"
    joined = "; joined a load already in flight" if r.joined else ""
    if r.action == "reloaded" and r.previous_options is not None:
        return (f"reloaded {r.model}: {r.previous_options.describe_diff(r.options)} "
                f"({seconds(r.seconds)}; {where}{joined})")
    return f"loaded {r.model} in {seconds(r.seconds)} ({where}{joined})"


def describe_unload(r: UnloadResult) -> str:
    """``unloaded big on http://gpu-box:13305 (pid 4242) in 0.3 s``, as ``%lemon_unload`` says it."""
    what = "cancelled the load of" if r.cancelled_load else "unloaded"
    where = f" {r.detail}" if r.detail.startswith("on ") else ""
    more = f"; {r.detail}" if r.detail and not where else ""
    pid = f" (pid {r.pid})" if r.pid else ""
    return f"{what} {r.model}{where}{pid} in {seconds(r.seconds)}{more}"


def _describe_remote_load(r: LoadResult) -> str:
    """``loaded big on http://gpu-box:13305 in 3.2 s (lemonade remote, pid 4242, ctx 16384)``."""
    parts = [r.backend] + ([f"pid {r.pid}"] if r.pid else [])
    parts += [f"ctx {r.options.ctx_size}"] if r.options.ctx_size else []
    joined = "; joined a load already in flight" if r.joined else ""
    if r.backend.startswith("openai"):
        return (f"{r.model} is served by {r.remote} (listed there; an openai remote loads it "
                f"itself) — checked in {seconds(r.seconds)}{joined}")
    differ = "".join(f"; note: the remote reports {k} {v} (asked {asked})"
                     for k, (v, asked) in r.options_differ.items())
    return (f"{r.action} {r.model} on {r.remote} in {seconds(r.seconds)} "
            f"({', '.join(parts)}{joined}){differ}")


def load_note(r: LoadResult) -> str | None:
    """What an inference cell says about the load it triggered, if anything."""
    if r.options_differ:
        diff = ", ".join(f"{k} {loaded} (asked {asked})" for k, (loaded, asked) in r.options_differ.items())
        return (f"note: {r.model} is loaded with {diff}; using it as it is "
                f"(%lemon_load to reload)")
    if r.action == "loaded":
        if r.remote is not None:  # an openai remote loads nothing: it was only found listed
            return None if r.backend.startswith("openai") else \
                f"auto-loaded {r.model} on {r.remote} in {seconds(r.seconds)}"
        return f"auto-loaded {r.model} in {seconds(r.seconds)} ({r.backend}, pid {r.pid})"
    return None
