"""The exceptions lemon_magic raises.

Every error builds its one-sentence message in ``__init__`` and carries the
fields a UI needs (``model``, ``returncode``, ``log_tail``)::

    LemonError                      base of everything lemon_magic raises
    ├── ModelNotFound               a name that is neither registered nor a .gguf path
    ├── InvalidModelFile            a path that is missing, empty or not GGUF
    ├── InvalidOptions (ValueError) a load option that is not valid
    ├── BackendUnavailable          the backend program is missing or not runnable
    ├── ModelNotLoaded              unload of a model that is not loaded
    ├── LoadError                   a load that did not end with a ready backend
    │   ├── BackendStartError       the backend could not be spawned
    │   ├── BackendExited           the backend exited (at start, or later: crashed)
    │   ├── HealthCheckTimeout      the backend never became healthy in time
    │   ├── LoadCancelled           an unload or an eviction cancelled the load
    │   ├── NotEnoughMemory         memory admission refused the load
    │   └── SlotsFull               every slot of the model's type is pinned
    ├── InferenceError              a request to a ready backend failed
    │   ├── BackendCrashed          the backend exited while serving the request
    │   └── RequestTimeout          the request ran past its deadline or idle gap
    ├── WaitTimeout                 a bounded wait ran out
    ├── LoadQueueFull               too many loads with other options already wait for the model
    ├── RemoteError                 a remote server gave an answer lemon_magic cannot use
    │   ├── RemoteUnreachable       no answer: refused, timed out, TLS failed
    │   └── RemoteAuthError         the remote refused the API key (401/403)
    └── PullError                   a pull from the Hugging Face Hub that did not complete
        ├── InvalidCheckpoint (ValueError)  not ``org/repo[:VARIANT]``
        ├── HubUnreachable          offline (HF_HUB_OFFLINE) or the Hub cannot be reached
        ├── RepoNotFound            no such repo (or a private one, without a token)
        ├── RepoAccessDenied        a gated or private repo, without a token that has access
        ├── VariantNotFound         no file of the repo matches the variant
        ├── DiskFull                not enough free space for the download
        ├── ChecksumMismatch        a downloaded file is not what the Hub lists
        ├── NotGGUF                 a downloaded model file is not GGUF
        └── PullCancelled           the pull was cancelled (Stop)

Misuse of the API (a closed router) raises :class:`RouterClosed`, a
``RuntimeError``; a lifecycle bug (a state change the transition table does not
allow) raises :class:`IllegalTransition`. A Stop (``KeyboardInterrupt``) while
a call waits is re-raised as :class:`Interrupted`, which says what goes on.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = (
    "BackendCrashed",
    "BackendExited",
    "BackendStartError",
    "BackendUnavailable",
    "ChecksumMismatch",
    "DiskFull",
    "HealthCheckTimeout",
    "HubUnreachable",
    "IllegalTransition",
    "InferenceError",
    "Interrupted",
    "InvalidCheckpoint",
    "InvalidModelFile",
    "InvalidOptions",
    "LemonError",
    "LoadCancelled",
    "LoadError",
    "LoadQueueFull",
    "ModelNotFound",
    "ModelNotLoaded",
    "NotDownloaded",
    "NotEnoughMemory",
    "NotGGUF",
    "PullCancelled",
    "PullError",
    "RemoteAuthError",
    "RemoteError",
    "RemoteUnreachable",
    "RepoAccessDenied",
    "RepoNotFound",
    "RequestTimeout",
    "RouterClosed",
    "SlotsFull",
    "VariantNotFound",
    "WaitTimeout",
)


class LemonError(Exception):
    """Base class of every error lemon_magic raises on purpose."""

    model: str | None = None
    log_tail: tuple[str, ...] = ()

    def __init__(self, message: str, *, model: str | None = None,
                 log_tail: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.model = model
        self.log_tail = tuple(log_tail)

    @property
    def message(self) -> str:
        """The one-sentence description, without the log tail."""
        return str(self.args[0])

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of a traceback (the cell still fails)."""
        return [f"{type(self).__name__}: {self.render()}"]

    def render(self) -> str:
        """The message followed by the backend's log tail, for display."""
        if not self.log_tail:
            return self.message
        tail = "\n".join(f"  | {line}" for line in self.log_tail)
        return f"{self.message}\nlast lines of the backend log:\n{tail}"


class ModelNotFound(LemonError):
    """Raised when a model name is neither registered nor a path to a ``.gguf`` file."""

    def __init__(self, name: str, known: Sequence[str] = (), *, paths: bool = True,
                 what: str | None = None) -> None:
        """:param paths: whether a ``.gguf`` path would have been taken (not over HTTP).
        :param what: what ``name`` should have been, if not a model name."""
        hint = f" (known models: {', '.join(sorted(known))})" if known else ""
        what = what or ("a registered name or a .gguf path" if paths else "a registered model name")
        super().__init__(f"unknown model {name!r}: not {what}{hint}", model=name)


class InvalidModelFile(LemonError):
    """Raised when a model file is missing, empty, truncated in its header or not GGUF."""

    def __init__(self, path: str, problem: str, *, model: str | None = None) -> None:
        self.path = path
        super().__init__(f"model file {path} {problem}", model=model)


class InvalidOptions(LemonError, ValueError):
    """Raised when a load option is not valid (the message names the option)."""


class BackendUnavailable(LemonError):
    """Raised when a backend's program cannot be found or run."""


class ModelNotLoaded(LemonError):
    """Raised by ``unload`` when the model is not loaded."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} is not loaded", model=model)


class LoadError(LemonError):
    """Base of the errors that end a load without a ready backend."""


class BackendStartError(LoadError):
    """Raised when the backend process could not be spawned at all."""


class BackendExited(LoadError):
    """Raised when a backend exits: during its start, or later (a crash)."""

    def __init__(self, model: str, returncode: int | None, when: str,
                 log_tail: Sequence[str] = ()) -> None:
        self.returncode = returncode
        code = "unknown code" if returncode is None else _describe_returncode(returncode)
        super().__init__(f"backend of {model!r} exited {when} ({code})", model=model,
                         log_tail=log_tail)


class HealthCheckTimeout(LoadError):
    """Raised when a backend does not become healthy within the start timeout."""

    def __init__(self, model: str, seconds: float, log_tail: Sequence[str] = ()) -> None:
        super().__init__(f"backend of {model!r} did not become healthy within {seconds:g} s; "
                         "it was stopped", model=model, log_tail=log_tail)


class LoadCancelled(LoadError):
    """Raised to the waiters of a load that an unload or an eviction cancelled."""


class NotEnoughMemory(LoadError):
    """Raised when memory admission refuses a load that cannot fit."""


class SlotsFull(LoadError):
    """Raised when every slot of a model type is held by a pinned model."""


class InferenceError(LemonError):
    """Raised when a request to a ready backend fails; ``status`` is the backend's HTTP status
    when it answered with an error (``None`` otherwise)."""

    def __init__(self, message: str, *, model: str | None = None, log_tail: Sequence[str] = (),
                 status: int | None = None) -> None:
        super().__init__(message, model=model, log_tail=log_tail)
        self.status = status


class BackendCrashed(InferenceError):
    """Raised when a backend exits while it serves a request."""

    def __init__(self, model: str, returncode: int | None, log_tail: Sequence[str] = ()) -> None:
        self.returncode = returncode
        code = "unknown code" if returncode is None else _describe_returncode(returncode)
        super().__init__(f"backend of {model!r} exited while serving the request ({code})",
                         model=model, log_tail=log_tail)


class RequestTimeout(InferenceError):
    """Raised when a request runs past ``request_timeout`` (whole answer) or
    ``stream_idle_timeout`` (silence between two streamed pieces)."""


class WaitTimeout(LemonError):
    """Raised when a bounded wait (for a load, or for requests to drain) runs out."""


class LoadQueueFull(LemonError):
    """Raised by an explicit load when ``queued`` loads asking the model for other options
    already wait for it (``RouterConfig.max_queued_loads``): each would be one more reload in a
    row. ``retry_after`` is a guess, in seconds, of when the queue has moved (issue 21)."""

    def __init__(self, model: str, queued: int, retry_after: int) -> None:
        super().__init__(f"{queued} loads of {model!r} with other options are already waiting; "
                         f"retry in {retry_after} s", model=model)
        self.queued = queued
        self.retry_after = retry_after


class RemoteError(LemonError):
    """Raised when a remote server (``--remote``) answers something lemon_magic cannot use;
    ``url`` is the remote's base URL as registered."""

    def __init__(self, message: str, *, url: str, model: str | None = None) -> None:
        super().__init__(message, model=model)
        self.url = url


class RemoteUnreachable(RemoteError):
    """Raised when a remote server cannot be reached: connection refused, no answer within the
    bounded timeout, or a TLS failure (``why`` says which)."""

    def __init__(self, url: str, why: str, *, model: str | None = None) -> None:
        self.why = why
        super().__init__(f"remote {url} is unreachable: {why}", url=url, model=model)


class RemoteAuthError(RemoteError):
    """Raised on a remote's 401/403; says which environment variable holds (or should hold) the
    key. The key itself is never part of the message."""

    def __init__(self, url: str, status: int, env: str | None, *, key_set: bool,
                 model: str | None = None) -> None:
        self.status = status
        if env is None:
            fix = "register it with --api-key-env NAME and set $NAME to its API key"
        elif key_set:
            fix = f"the key in ${env} was refused; set ${env} to a key this server accepts"
        else:
            fix = f"set ${env} to its API key"
        super().__init__(f"remote {url} refused the request (HTTP {status}): {fix}",
                         url=url, model=model)


class PullError(LemonError):
    """Base of the errors that end a pull from the Hugging Face Hub; ``checkpoint`` names it.

    A failed pull leaves the cache as it was: files of the checkpoint that were
    complete before stay, a file that failed its checks is removed.
    """

    def __init__(self, message: str, *, checkpoint: str | None = None) -> None:
        super().__init__(message, model=checkpoint)
        self.checkpoint = checkpoint


class InvalidCheckpoint(PullError, ValueError):
    """Raised when a checkpoint is not written ``org/repo`` or ``org/repo:VARIANT``."""

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f"checkpoint {text!r} {problem} (write org/repo or org/repo:VARIANT)",
                         checkpoint=text)


class HubUnreachable(PullError):
    """Raised when a checkpoint is not in the local cache and the Hub cannot be asked: offline mode
    (``HF_HUB_OFFLINE=1``) or no connection; ``available`` lists what is downloaded."""

    def __init__(self, checkpoint: str, why: str, available: Sequence[str] = ()) -> None:
        self.available = tuple(available)
        have = (f"downloaded: {', '.join(self.available)}" if self.available
                else "no model is downloaded")
        super().__init__(f"cannot pull {checkpoint}: {why}, and it is not downloaded ({have})",
                         checkpoint=checkpoint)


class RepoNotFound(PullError):
    """Raised when the Hub has no such repo (or revision); without a token, a private repo
    looks the same, so the message says so."""

    def __init__(self, checkpoint: str, repo: str, endpoint: str, *, has_token: bool) -> None:
        hint = "" if has_token else " (if it is private, set HF_TOKEN)"
        super().__init__(f"no repo {repo} on {endpoint}{hint}", checkpoint=checkpoint)


class RepoAccessDenied(PullError):
    """Raised on 401/403: a gated or private repo without a token that has access, or a token
    the Hub refuses (``token_refused``: invalid or revoked)."""

    def __init__(self, checkpoint: str, repo: str, status: int, *, has_token: bool,
                 token_refused: bool = False) -> None:
        self.status = status
        if token_refused:
            text = f"the Hub refused the token in HF_TOKEN (HTTP {status}): fix it, or unset it for {repo}"
        else:
            fix = ("the token in HF_TOKEN has no access to it (accept its conditions on the Hub, or use "
                   "a token that can read it)") if has_token else "set HF_TOKEN to a token that can read it"
            text = f"repo {repo} is gated or private (HTTP {status}): {fix}"
        super().__init__(text, checkpoint=checkpoint)


class VariantNotFound(PullError):
    """Raised when no GGUF file of the repo matches the variant; ``variants`` lists those there are."""

    def __init__(self, checkpoint: str, variant: str, variants: Sequence[str]) -> None:
        self.variants = tuple(variants)
        there = ", ".join(self.variants) if self.variants else "none: the repo has no .gguf file"
        super().__init__(f"no file of {checkpoint.split(':')[0]} matches {variant!r} (variants: {there})",
                         checkpoint=checkpoint)


class DiskFull(PullError):
    """Raised when the cache's disk has less free space than the download needs."""

    def __init__(self, checkpoint: str, needed: int, free: int, where: str) -> None:
        self.needed, self.free = needed, free
        super().__init__(f"not enough disk space to pull {checkpoint}: {needed / 1e6:.1f} MB needed, "
                         f"{free / 1e6:.1f} MB free in {where}", checkpoint=checkpoint)


class ChecksumMismatch(PullError):
    """Raised when a downloaded file's sha256 differs from the one the Hub lists (it is removed)."""

    def __init__(self, checkpoint: str, filename: str, expected: str, actual: str) -> None:
        super().__init__(f"{filename} of {checkpoint} is corrupt: sha256 {actual[:12]}..., "
                         f"the Hub lists {expected[:12]}... (removed; pull again)", checkpoint=checkpoint)


class NotGGUF(PullError):
    """Raised when a downloaded model file does not start with the GGUF magic (it is removed)."""

    def __init__(self, checkpoint: str, filename: str, head: bytes) -> None:
        super().__init__(f"{filename} of {checkpoint} is not a GGUF file (it starts with {head!r})",
                         checkpoint=checkpoint)


class NotDownloaded(LemonError):
    """Raised by ``plan`` for a model that a load would pull first (not an error of the load)."""

    def __init__(self, model: str, checkpoint: str, size: int | None = None) -> None:
        self.checkpoint, self.size = checkpoint, size
        about = f", about {size / 1e6:.0f} MB" if size else ""
        super().__init__(f"{model} is not downloaded yet: loading it pulls {checkpoint} from the "
                         f"Hugging Face Hub first{about}", model=model)


class PullCancelled(PullError):
    """Raised when a pull is cancelled; files completed before stay in the cache."""

    def __init__(self, checkpoint: str) -> None:
        super().__init__(f"the pull of {checkpoint} was cancelled", checkpoint=checkpoint)


class RouterClosed(RuntimeError):
    """Raised when the router is used after it was closed."""

    def __init__(self) -> None:
        super().__init__("the lemon_magic router is closed; call get_router() for a new one")


class IllegalTransition(RuntimeError):
    """Raised when a model's state would change in a way the transition table forbids (a bug)."""

    def __init__(self, model: str, old: object, new: object) -> None:
        super().__init__(f"illegal transition {old} -> {new} for {model!r}")


class Interrupted(KeyboardInterrupt):
    """Raised when Stop (``KeyboardInterrupt``) ends a call that was waiting; says what goes on.

    ``phase`` is ``"load"`` (the model was still loading: the load goes on in the
    background), ``"pull"`` (its download is cancelled), ``"request"`` (a request was
    cancelled) or ``"stream"`` (the generation was stopped; what was read is partial).
    """

    def __init__(self, model: str, phase: str) -> None:
        self.model, self.phase = model, phase
        text = {"load": f"stopped waiting for {model} to load; the load goes on in the background",
                "pull": f"stopped the download of {model} (unless another caller waits for it: "
                        "then it goes on); nothing is registered until it completes",
                "request": "the request was cancelled",
                "stream": "generation stopped; the text above is partial"}[phase]
        super().__init__(text)

    def _render_traceback_(self) -> list[str]:
        return [f"interrupted: {self.args[0]}"]


def _describe_returncode(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
