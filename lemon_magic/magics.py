"""The IPython magics: parse the line, make one router call, render the result.

No load decision is made here: the router decides, the magics only report.
A magic imports what it needs (the router, the renderers, the widgets) when it
first runs, so that ``%load_ext lemon_magic`` stays cheap (issue 20).
Output is written from the main thread while the cell runs (the only way that
is both live in the notebook and seen by nbval); errors raise, so the cell
fails with a short message instead of a traceback.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Float, Int, Unicode, observe

from lemon_magic import errors
from lemon_magic._catalog_magics import CatalogMagics
from lemon_magic._magic_args import Interrupted, _interrupted, _no_abbrev, _parse
from lemon_magic._sampling import check_sampling
from lemon_magic.errors import LemonError
from lemon_magic.options import LoadOptions

if TYPE_CHECKING:
    from lemon_magic import _render
    from lemon_magic._records import Completion
    from lemon_magic.runtime import Router

__all__ = ("InferenceText", "Interrupted", "LemonMagics")

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*\}\}")
_NBVAL_MARKER = re.compile(r"^\s*#\s*NBVAL_\w+\s*$", re.MULTILINE)


class InferenceText(str):
    """The text ``%%lemon_infer -o VAR`` stores: a ``str``, with the full response attached."""

    completion: Completion | None

    def __new__(cls, text: str, completion: Completion | None) -> InferenceText:
        obj = super().__new__(cls, text)
        obj.completion = completion
        return obj


@magics_class
class LemonMagics(CatalogMagics, Magics):
    """Magics that load local LLMs declaratively and run inference on them.

    Defaults are traits: ``%config LemonMagics.ctx_size = 8192``, or
    ``[tool.lemon_magic]`` in a ``pyproject.toml`` next to the notebook.
    """

    #: ``registry.DEFAULT_MODEL``, written out: the registry is not imported by %load_ext
    default_model = Unicode("gemma3-270m", help="model used when a magic names none").tag(config=True)
    ctx_size = Int(None, allow_none=True, help="default context size for loads").tag(config=True)
    threads = Int(None, allow_none=True, help="default CPU threads for loads").tag(config=True)
    backend = Unicode(None, allow_none=True,
                      help="default backend: llama-server, llama-cpp-python or auto").tag(config=True)
    stream = Bool(True, help="stream tokens into the cell as they arrive").tag(config=True)
    max_tokens = Int(256, help="default max_tokens for %%lemon_infer").tag(config=True)
    start_timeout = Float(120.0, help="seconds a backend may take to become healthy").tag(config=True)
    request_timeout = Float(600.0, help="seconds a whole non-streamed request may take").tag(config=True)
    stream_idle_timeout = Float(120.0, help="seconds a streamed answer may stay silent (the first "
                                "token included)").tag(config=True)
    load_wait_timeout = Float(300.0, help="seconds a call waits for a load in flight").tag(config=True)
    idle_timeout = Float(None, allow_none=True, help="unload a ready model after this many seconds "
                         "without a request (None: never; pinned models never)").tag(config=True)

    _ROUTER_SETTINGS = ("start_timeout", "request_timeout", "stream_idle_timeout",
                        "load_wait_timeout", "idle_timeout")
    _LOAD_DEFAULTS = ("ctx_size", "threads", "backend")

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        self._router: Router | None = None  # before super(): config may fire the observers
        super().__init__(shell, **kwargs)

    # ----------------------------------------------------------------- plumbing

    @property
    def router(self) -> Router:
        """The process's router, with this instance's settings applied."""
        if self._router is None or self._router.closed:
            from lemon_magic.runtime import get_router

            self._router = get_router()
            self._router.configure(**self._router_settings())
        return self._router

    def _router_settings(self) -> dict[str, Any]:
        settings = {k: getattr(self, k) for k in self._ROUTER_SETTINGS}
        settings["default_options"] = LoadOptions.from_kwargs(
            {k: getattr(self, k) for k in self._LOAD_DEFAULTS if getattr(self, k) is not None})
        return settings

    @observe(*_ROUTER_SETTINGS, *_LOAD_DEFAULTS)
    def _router_setting_changed(self, change: dict[str, Any]) -> None:
        # the load defaults are router settings (below a model's registration), so the magics,
        # the Python API and the widgets all resolve options the same way
        self.router.configure(**self._router_settings())
        if change["name"] in self._LOAD_DEFAULTS:
            self._warn_about_next_loads()

    def _warn_about_next_loads(self) -> None:
        """Say which loaded models the next plain ``%lemon_load MODEL`` would now reload."""
        from lemon_magic._policy import ModelState

        for status in self.router.status():
            if status.state is not ModelState.READY or status.remote is not None:
                continue  # the load defaults never apply to a remote model (its server's do)
            try:
                plan = self.router.plan(status.name)
            except LemonError as exc:
                print(f"note: the next %lemon_load {status.name} would fail: {exc.message}")
                continue
            if plan.action == "reload" and plan.current is not None:
                print(f"note: the next %lemon_load {status.name} will reload it: "
                      f"{plan.current.describe_diff(plan.options)}")

    def _model(self, name: str | None) -> str:
        return name or self.default_model

    # ----------------------------------------------------------------- %lemon_load

    @_no_abbrev
    @magic_arguments()
    @argument("model", nargs="?",
              help="a registered name or a .gguf path (default: LemonMagics.default_model)")
    @argument("--ctx-size", help="context size in tokens, or auto")
    @argument("--threads", help="CPU threads, or auto")
    @argument("--backend", help="llama-server, llama-cpp-python or auto (a lemonade remote: its "
                                "llama.cpp device, e.g. cpu, cuda, vulkan)")
    @argument("--extra-args", help='more backend flags, as one quoted string: --extra-args="--flash-attn on"')
    @argument("--chat-template", help="a chat template name the backend knows (e.g. gemma)")
    @argument("--pin", action="store_true", help="never evict this model to make room")
    @argument("--unpin", action="store_true", help="let this model be evicted again")
    @line_magic
    def lemon_load(self, line: str) -> None:
        """Ensure a model is loaded with these options (declarative).

        Same options as loaded: a no-op. Other options: the old backend is
        stopped and a new one started, atomically. Concurrent loads of one
        model share a single start. A remote model (%lemon_register NAME
        --remote URL) is loaded on its server, decided against what that
        server reports it has loaded now.

        In [1]: %lemon_load gemma3-270m --ctx-size 4096
        loaded gemma3-270m in 0.8 s (llama-server, pid 4242, ctx 4096)
        In [2]: %lemon_load gemma3-270m --ctx-size 4096
        already loaded with these options (no-op, 0.05 ms)
        In [3]: %lemon_load gemma3-270m --ctx-size 8192
        reloaded gemma3-270m: ctx_size 4096 → 8192 (0.8 s; llama-server, pid 4243, ctx 8192)
        """
        from lemon_magic._progress import PullBar
        from lemon_magic._render import describe_load

        args = _parse(self.lemon_load, line)
        if args.pin and args.unpin:
            raise UsageError("--pin and --unpin contradict each other")
        given = {"ctx_size": args.ctx_size, "threads": args.threads, "backend": args.backend,
                 "extra_args": args.extra_args, "chat_template": args.chat_template}
        options = {k: v for k, v in given.items() if v is not None}
        pin = True if args.pin else (False if args.unpin else None)
        model = self._model(args.model)
        bar = PullBar(model)
        try:
            try:
                LoadOptions.from_kwargs(options)  # a value that is not one: an argument mistake
                plan = self.router.plan(model, **options)
                if plan.action == "reload":
                    print(plan.describe() + " …", flush=True)  # said before the old process goes
            except errors.NotDownloaded as exc:
                print(exc.message + " …", flush=True)
            except errors.InvalidOptions as exc:  # refused before anything was done
                raise UsageError(exc.message) from None
            result = self.router.load(model, pin=pin, progress=bar, **options)
            bar.close(done=True)
        except errors.Interrupted as exc:
            raise _interrupted(exc) from None
        except KeyboardInterrupt:
            raise _interrupted(errors.Interrupted(model, "load")) from None
        finally:
            bar.close()
        print(describe_load(result))

    # ----------------------------------------------------------------- %%lemon_infer

    @_no_abbrev
    @magic_arguments()
    @argument("-m", "--model", help="model to use (default: LemonMagics.default_model)")
    @argument("--chat", action="store_true", help="chat (the cell is the user message) instead of completion")
    @argument("--system", help="system message for --chat")
    @argument("--max-tokens", type=int, help="at most this many tokens (default: LemonMagics.max_tokens)")
    @argument("--temperature", type=float, help="sampling temperature (0: deterministic)")
    @argument("--top-p", type=float, help="nucleus sampling")
    @argument("--seed", type=int, help="sampling seed")
    @argument("--stop", action="append", help="stop sequence (repeatable)")
    @argument("--no-stream", action="store_true", help="print the whole text at the end")
    @argument("-o", "--output", help="store the text in this variable (its .completion is the full response)")
    @argument("-i", "--interpolate", action="store_true",
              help="replace {{name}} with notebook variables (other braces are left alone)")
    @argument("--ctx-size", help="context size to load with if the model is not loaded yet "
                                 "(a loaded model is used as it is)")
    @cell_magic
    def lemon_infer(self, line: str, cell: str) -> None:
        """Run the cell as a prompt: completion by default, chat with --chat.

        Tokens stream into the cell as they arrive. Inference loads the model if
        needed but never reloads it: loaded with other options, it is used as it
        is and the cell says so.

        In [1]: %%lemon_infer -m gemma3-270m --max-tokens 16 --temperature 0 -o story
           ...: Once upon a time
        , there was a little girl named Lily.
        """
        args = _parse(self.lemon_infer, line)
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"-o needs a variable name, got {args.output!r}")
        prompt = _NBVAL_MARKER.sub("", cell).strip("\n")
        if args.interpolate:
            prompt = self._interpolate(prompt)
        if not prompt.strip():
            raise UsageError("the cell is empty: write a prompt below %%lemon_infer")
        model = self._model(args.model)
        if args.max_tokens is not None and args.max_tokens <= 0:
            raise UsageError(f"--max-tokens must be a positive number, got {args.max_tokens}")
        max_tokens = self.max_tokens if args.max_tokens is None else args.max_tokens
        try:
            check_sampling(args.temperature, args.top_p)
            load_options = LoadOptions.from_kwargs({"ctx_size": args.ctx_size}) \
                if args.ctx_size else None
        except errors.InvalidOptions as exc:
            raise UsageError(exc.message) from None
        sampling = {"max_tokens": max_tokens, "temperature": args.temperature,
                    "top_p": args.top_p, "seed": args.seed, "stop": args.stop,
                    "load_options": load_options}
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": prompt})
            call: Callable[..., Any] = lambda **kw: self.router.chat(model, messages, **kw)  # noqa: E731
        elif args.system:
            raise UsageError("--system needs --chat")
        else:
            call = lambda **kw: self.router.complete(model, prompt, **kw)  # noqa: E731
        completion: Completion | None
        if args.no_stream or not self.stream:
            completion = self._run_whole(call, sampling)
        else:
            completion = self._run_streamed(call, sampling, args.output)
        if args.output:
            self._user_ns[args.output] = InferenceText(completion.text if completion else "",
                                                            completion)

    def _run_whole(self, call: Callable[..., Any], sampling: dict[str, Any]) -> Completion:
        from lemon_magic._render import load_note

        try:
            completion: Completion = call(stream=False, **sampling)
        except errors.Interrupted as exc:
            raise _interrupted(exc) from None
        note = load_note(completion.load)
        try:
            if note:
                print(note)
            print(completion.text)
        except KeyboardInterrupt:  # Stop while printing: the answer had come in whole
            raise Interrupted("output stopped; the text above is partial") from None
        return completion

    def _run_streamed(self, call: Callable[..., Any], sampling: dict[str, Any],
                      output: str | None = None) -> Completion | None:
        from lemon_magic._render import load_note

        out = sys.stdout
        stream = call(stream=True, **sampling)  # starts nothing yet
        parts: list[str] = []
        with stream:
            try:
                load = stream.wait_loaded()
                note = load and load_note(load)
                if note:
                    print(note)
                for chunk in stream:
                    parts.append(chunk)
                    out.write(chunk)
                    out.flush()
            except KeyboardInterrupt as exc:  # from the stream, or Stop while printing
                if not isinstance(exc, errors.Interrupted):
                    exc = errors.Interrupted(stream.load.model if stream.load else "the model",
                                             "stream" if stream.load else "load")
                if exc.phase != "load":
                    out.write("\n")
                if output and parts:  # the partial text is kept, as on the screen
                    self._user_ns[output] = InferenceText("".join(parts), None)
                    out.write(f"(the partial text is in {output})\n")
                raise _interrupted(exc) from None
        out.write("\n")
        done: Completion | None = stream.completion
        return done

    @property
    def _user_ns(self) -> dict[str, Any]:
        if self.shell is None:
            raise UsageError("lemon_magic's magics need an IPython shell")
        ns: dict[str, Any] = self.shell.user_ns
        return ns

    def _interpolate(self, prompt: str) -> str:
        ns = self._user_ns

        def value(match: re.Match[str]) -> str:
            first, *rest = match.group(1).split(".")
            if first not in ns:
                raise UsageError(f"{{{{{match.group(1)}}}}}: no variable {first!r} in the notebook")
            obj = ns[first]
            for attr in rest:
                try:
                    obj = getattr(obj, attr)
                except AttributeError:
                    raise UsageError(f"{{{{{match.group(1)}}}}}: {type(obj).__name__} has no "
                                     f"attribute {attr!r}") from None
            return str(obj)

        return _PLACEHOLDER.sub(value, prompt)

    # ----------------------------------------------------------------- %lemon_unload

    @_no_abbrev
    @magic_arguments()
    @argument("model", nargs="?", help="model to unload (default: LemonMagics.default_model)")
    @argument("--all", action="store_true", help="unload every model")
    @line_magic
    def lemon_unload(self, line: str) -> None:
        """Stop a model's backend (a load in flight is cancelled); a remote model is unloaded on
        its server (an openai remote, which has no unload, is only let go here).

        In [1]: %lemon_unload gemma3-270m
        unloaded gemma3-270m (pid 4242) in 0.1 s
        """
        from lemon_magic._render import describe_unload

        args = _parse(self.lemon_unload, line)
        if args.all and args.model:
            raise UsageError("give a model or --all, not both")
        try:
            results = self.router.unload_all() if args.all else [self.router.unload(self._model(args.model))]
        except KeyboardInterrupt:
            raise Interrupted("stopped waiting; the unload goes on in the background") from None
        except LemonError as exc:  # --all: say what did go before the one that failed
            for r in getattr(exc, "unloaded", ()):
                print(describe_unload(r))
            raise
        if not results:
            print("nothing was loaded")
        for r in results:
            print(describe_unload(r))

    # ----------------------------------------------------------------- read-only magics

    @line_magic
    def lemon_status(self, line: str) -> _render.StatusTable:
        """Every model the router knows: state, backend, pid, options, memory, timings, errors (a
        remote model: where, and its pid and options as its server reports them).

        In [1]: %lemon_status
        """
        if line.strip():
            raise UsageError("%lemon_status takes no arguments")
        from lemon_magic._render import StatusTable

        router = self.router
        return StatusTable(router.status(), router.serving)

    @_no_abbrev
    @magic_arguments()
    @argument("model", nargs="?", help="model (default: LemonMagics.default_model)")
    @argument("-n", type=int, default=40, help="number of lines (default 40)")
    @line_magic
    def lemon_logs(self, line: str) -> None:
        """The tail of a model's backend log (of its last process if it stopped).

        In [1]: %lemon_logs gemma3-270m -n 5
        """
        args = _parse(self.lemon_logs, line)
        if args.n <= 0:
            raise UsageError(f"-n must be a positive number of lines, got {args.n}")
        for log_line in self.router.logs(self._model(args.model), args.n):
            print(log_line)

    @_no_abbrev
    @magic_arguments()
    @argument("--port", type=int, help="port on 127.0.0.1 (default 13305, or where it serves "
                                       "now; 0: any)")
    @argument("--stop", action="store_true", help="stop serving (the models stay loaded)")
    @line_magic
    def lemon_serve(self, line: str) -> None:
        """Serve this router's Lemonade- and OpenAI-compatible HTTP API (README: Serving over HTTP).

        Declarative, like %lemon_load: serving already at that address is a no-op; another
        port moves the server there, and says so (the old URL stops answering).

        In [1]: %lemon_serve
        serving http://127.0.0.1:13305/api/v1 (OpenAI base URL: http://127.0.0.1:13305/api/v1)
        In [2]: %lemon_serve
        already serving http://127.0.0.1:13305/api/v1 (no change; OpenAI base URL: http://127.0.0.1:13305/api/v1)
        """
        from lemon_magic.server._magic import serve_line

        args = _parse(self.lemon_serve, line)
        print(serve_line(self.router, args.port, args.stop))

    @line_magic
    def lemon_panel(self, line: str) -> Any:
        """Show the kernel's panel: live model rows and a load form that warns before a reload.

        In [1]: %lemon_panel
        """
        if line.strip():
            raise UsageError("%lemon_panel takes no arguments")
        global _panel
        if _panel is None or _panel.router is not self.router or _panel.router.closed:
            from lemon_magic.widgets import LemonPanel

            if _panel is not None:
                _panel.close()  # its router is gone: stop its thread too
            _panel = LemonPanel(self.router)
        return _panel

    # ----------------------------------------------------------------- completion

    def complete_model_names(self, text: str) -> list[str]:
        """Model names for tab completion: registered names and models the router knows."""
        router = self.router
        names = {*router.model_names(), *(s.name for s in router.status())}
        return sorted(n for n in names if n.startswith(text))


MAGIC_NAMES = ("lemon_load", "lemon_infer", "lemon_unload", "lemon_status", "lemon_models",
               "lemon_logs", "lemon_register", "lemon_unregister", "lemon_pull", "lemon_delete",
               "lemon_serve", "lemon_panel")
_panel: Any = None  # the kernel's panel (one per kernel)


def apply_pyproject(magics: LemonMagics, directory: Path) -> list[str]:
    """Apply ``[tool.lemon_magic]`` from ``directory/pyproject.toml``; returns what it set.

    :raises LemonError: the table names a setting that does not exist.
    """
    path = directory / "pyproject.toml"
    if not path.is_file():
        return []
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # tomllib is 3.11+; tomli is the same parser (a dependency on 3.10 only)
        import tomli as tomllib

    try:
        table = tomllib.loads(path.read_text()).get("tool", {}).get("lemon_magic", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LemonError(f"cannot read {path}: {exc}") from None
    known = set(magics.class_trait_names(config=True))
    applied = []
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise LemonError(f"{path}: [tool.lemon_magic] has no setting {key!r} "
                             f"(known: {', '.join(sorted(known))})")
        setattr(magics, name, value)
        applied.append(f"{name}={value!r}")
    return applied
