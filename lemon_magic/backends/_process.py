"""The shared process supervisor: spawn, log ring, readiness, exit watch, stop.

Every backend runs in its own session (``start_new_session=True``): the
notebook's Stop button signals the kernel's whole process group and would
otherwise kill it. So we clean up ourselves: ``PR_SET_PDEATHSIG`` kills the
backend when the thread that spawned it dies (we spawn from the router's
long-lived loop thread), and a pid record lets a later router reap backends
left by a process that was killed outright. For exit paths that cannot use
the event loop, a thread-safe registry of live backends per owner lets
:func:`kill_owned` SIGKILL them from any thread.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import IO, Literal

import anyio
import httpx

from lemon_magic.backends import _pidfile
from lemon_magic.errors import BackendExited, BackendStartError, HealthCheckTimeout

__all__ = ("BackendProcess", "free_port", "kill_owned")

log = logging.getLogger("lemon_magic.backends")

_PR_SET_PDEATHSIG = 1
#: libc on Linux, for prctl(PR_SET_PDEATHSIG); ``None`` where the platform has no parent death
#: signal (then no mechanism sets one: tests set it to ``None`` to act out such a platform).
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True) \
    if sys.platform.startswith("linux") else None
#: the longest backend log line kept whole (bytes); the rest of a longer line is dropped
MAX_LOG_LINE = 8192
_TRUNCATED = " [... line truncated at {} bytes]"
# Polling interval for readiness: starts short, grows, stays small so that
# we notice "healthy" within a few ms of the backend (see bench/).
_POLL_FIRST, _POLL_GROWTH, _POLL_MAX = 0.002, 1.5, 0.015


_ssl_context: ssl.SSLContext | None = None


def _client(timeout: float, headers: Mapping[str, str]) -> httpx.AsyncClient:
    """An HTTP client for one backend, sending ``headers`` (its key) with every request
    (httpx builds an SSL context per client: share one)."""
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    # No keep-alive: llama-server may close an idle connection just as we reuse it
    # ("Server disconnected without sending a response"), and it delays its exit on
    # SIGTERM while one is open. A loopback connect costs well under a millisecond.
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=5.0), verify=_ssl_context,
                             trust_env=False, limits=httpx.Limits(max_keepalive_connections=0),
                             headers=dict(headers))


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_setup(parent_pid: int) -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


@functools.lru_cache(maxsize=1)
def _find_setpriv() -> str | None:
    """util-linux's ``setpriv`` if it is there and knows ``--pdeathsig`` (util-linux 2.33+)."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        usage = subprocess.run([path, "--help"], capture_output=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if b"--pdeathsig" in usage else None


_PdeathsigVia = Literal["setpriv", "preexec_fn", "none"]


def _pdeathsig_via() -> _PdeathsigVia:
    """How :meth:`BackendProcess.spawn` sets the parent death signal on this machine."""
    if _libc is None:
        return "none"
    return "setpriv" if _find_setpriv() is not None else "preexec_fn"


def _resolve_program(program: str, env: dict[str, str] | None) -> str:
    """``program`` as exec would find it; OSError (as exec would raise) if it cannot be run."""
    if os.sep in program:
        if not os.path.exists(program):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if os.path.isdir(program) or not os.access(program, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        return program
    found = shutil.which(program, path=(os.environ if env is None else env).get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    return found


def _popen(argv: Sequence[str], env: dict[str, str] | None, via: _PdeathsigVia,
           cwd: str | os.PathLike[str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, its stdout and stderr on one pipe, PDEATHSIG set ``via``."""
    argv = list(argv)
    preexec = None
    if via == "setpriv":
        setpriv = _find_setpriv()
        assert setpriv is not None
        # check here what setpriv's exec would report later (exit 127): a missing program stays
        # an OSError at spawn, as with a direct exec
        argv = [setpriv, "--pdeathsig", "KILL", "--", _resolve_program(argv[0], env), *argv[1:]]
    elif via == "preexec_fn":
        parent = os.getpid()
        preexec = functools.partial(_child_setup, parent)
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env,
                            cwd=cwd, close_fds=True, preexec_fn=preexec)


# The live backends of each owner (an int the caller chooses, such as id(router)); guarded by a
# threading lock, since kill_owned() runs on threads that have no event loop (atexit, finalizers).
_live_lock = threading.Lock()
_live: dict[int, dict[int, BackendProcess]] = {}


def kill_owned(owner: int, reap_wait: float = 2.0) -> list[int]:
    """SIGKILL the process group of every live backend of ``owner``; return their pids.

    Thread-safe and needs no event loop: for last-resort exit paths (atexit, a
    finalizer, a dying kernel). Each backend is forgotten by the registry; it is
    reaped within ``reap_wait`` seconds in all, and its pid record is dropped once
    it is reaped (a record left behind lets a later router reap it). A later
    ``stop()`` of one of them is harmless.
    """
    with _live_lock:
        processes = list(_live.pop(owner, {}).values())
    for p in processes:
        p._signal_group(signal.SIGKILL)
    deadline = time.monotonic() + reap_wait
    for p in processes:
        try:
            p._popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("[%s] pid %d not reaped %g s after SIGKILL", p.model, p.pid, reap_wait)
            continue
        _pidfile.remove(p._record)
    return [p.pid for p in processes]


class _LogRing:
    """The last ``maxlen`` lines of a backend's stdout+stderr, filled by a daemon thread."""

    def __init__(self, stream: IO[bytes], maxlen: int, name: str) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=maxlen)
        self.total = 0
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True,
                                        name=f"lemon-log-{name}")
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        # readline(limit), not iteration: a backend that prints without a newline must not grow
        # one line without bound (issue 8). A line longer than MAX_LOG_LINE keeps its head and a
        # marker; the rest of it, up to its newline, is read and dropped.
        with stream:
            dropping = False
            while raw := stream.readline(MAX_LOG_LINE):
                complete = raw.endswith(b"\n")
                if not dropping:
                    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    if not complete and len(raw) == MAX_LOG_LINE:
                        line += _TRUNCATED.format(MAX_LOG_LINE)
                    self.lines.append(line)
                    self.total += 1
                dropping = not complete and len(raw) == MAX_LOG_LINE

    def tail(self, n: int) -> list[str]:
        return list(self.lines)[-n:] if n > 0 else []

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class BackendProcess:
    """One running backend process and everything needed to supervise it.

    Create it with :meth:`spawn` from the router's loop thread.
    """

    def __init__(self, model: str, argv: Sequence[str], port: int, popen: subprocess.Popen[bytes],
                 log_lines: int, request_timeout: float, owner: int = 0,
                 api_key: str | None = None) -> None:
        self.model = model
        self.argv = tuple(argv)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.started_at = time.monotonic()
        #: set by the owner once it stops the process on purpose (unload, eviction, reload,
        #: close): a request cut off then was not cut by a crash
        self.stopped_on_purpose = False
        self.owner = owner
        self._popen = popen
        assert popen.stdout is not None
        self._log = _LogRing(popen.stdout, log_lines, f"{model}-{popen.pid}")
        self._record = _pidfile.record(popen.pid, self.argv)
        #: what every request to this backend carries: the key only the router holds (issue 21)
        self.headers: Mapping[str, str] = MappingProxyType(
            {"Authorization": f"Bearer {api_key}"} if api_key else {})
        #: the client for this backend only (closed before SIGTERM), sending :attr:`headers`
        self.client = _client(request_timeout, self.headers)
        with _live_lock:
            _live.setdefault(owner, {})[popen.pid] = self

    @classmethod
    def spawn(cls, model: str, argv: Sequence[str], port: int, *, env: dict[str, str] | None = None,
              cwd: str | os.PathLike[str] | None = None, log_lines: int = 400,
              request_timeout: float = 600.0, owner: int = 0,
              api_key: str | None = None) -> BackendProcess:
        """Start ``argv`` (never through a shell) in its own session with PDEATHSIG set.

        The backend is recorded as live for ``owner`` until :meth:`stop` or
        :meth:`kill_now` has reaped it (see :func:`kill_owned`).

        How PDEATHSIG is set (issue 8, item 11): ``prctl(PR_SET_PDEATHSIG,
        SIGKILL)`` must run in the child, between fork and exec. We exec through
        util-linux's ``setpriv --pdeathsig KILL -- argv...``, which makes that
        call and execs the backend (same pid, its own argv afterwards), so no
        Python runs in the child. The alternative, ``preexec_fn``, runs Python
        code between fork and exec: CPython documents it as unsafe when threads
        exist (the child can deadlock on a lock some other thread held at fork,
        and a kernel always has threads), and it forces subprocess onto a full
        fork() instead of vfork, whose cost grows with the parent's memory
        (bench/bench_spawn.py measures both). What setpriv cannot do is what
        ``_child_setup`` does after its prctl: notice that the parent died
        before the call (``getppid()`` changed). A kernel killed in that window,
        about a millisecond after the fork, leaves its backend running with no
        pid record yet (it is written once spawn returns); we accept that.
        Without setpriv (util-linux older than 2.33, or none) we fall back to
        ``preexec_fn``; off Linux there is no PDEATHSIG at all.
        PDEATHSIG fires when the spawning *thread* exits: spawn from a
        long-lived thread (the router's loop thread).

        ``api_key``: what the client sends as ``Authorization: Bearer``; the backend gets it
        from ``env`` (``Backend.key_environment``), never from ``argv``.

        :raises BackendStartError: the program could not be executed.
        """
        try:
            popen = _popen(argv, env, _pdeathsig_via(), cwd)
        except OSError as exc:
            raise BackendStartError(f"cannot start the backend of {model!r}: {argv[0]}: "
                                    f"{exc.strerror or exc}", model=model) from exc
        log.info("[%s] spawned pid %d on port %d: %s", model, popen.pid, port, " ".join(argv))
        return cls(model, argv, port, popen, log_lines, request_timeout, owner, api_key)

    @property
    def pid(self) -> int:
        """The backend's pid (it is also its process group id)."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has exited and been reaped, else ``None``."""
        return self._popen.poll()

    def log_tail(self, n: int = 20) -> list[str]:
        """The last ``n`` lines the backend printed."""
        return self._log.tail(n)

    def log_mentions(self, *needles: str) -> bool:
        """Whether any recent log line contains one of ``needles`` (case-insensitive)."""
        lowered = [n.lower() for n in needles]
        return any(n in line.lower() for line in self._log.tail(50) for n in lowered)

    async def wait_healthy(self, path: str, timeout: float) -> None:
        """Poll ``path`` until it answers 200, checking on every poll that the process lives.

        :raises BackendExited: the process exited first (with its code and log tail).
        :raises HealthCheckTimeout: ``timeout`` seconds passed.
        """
        deadline = time.monotonic() + timeout
        interval = _POLL_FIRST
        url = self.url + path
        while True:
            if self.returncode is not None:
                await self._drain_log()
                raise BackendExited(self.model, self.returncode, "during start", self.log_tail())
            try:
                response = await self.client.get(url, timeout=1.0)
                if response.status_code == 200:
                    log.info("[%s] healthy after %.3f s", self.model, time.monotonic() - self.started_at)
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() >= deadline:
                raise HealthCheckTimeout(self.model, timeout, self.log_tail())
            await anyio.sleep(interval)
            interval = min(interval * _POLL_GROWTH, _POLL_MAX)

    async def _drain_log(self) -> None:
        # the pipe closes when the process exits; give the reader thread a moment to finish
        await anyio.to_thread.run_sync(self._log.join, 1.0)

    async def wait_exit(self) -> int:
        """Wait (without polling, through a pidfd on Linux) until the process exits; reap it."""
        if self.returncode is not None:
            return self.returncode
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            fd = None
        if fd is None:
            while self.returncode is None:
                await anyio.sleep(0.05)
        else:
            try:
                await anyio.wait_readable(fd)
            finally:
                anyio.notify_closing(fd)
                os.close(fd)
        code = self._popen.wait()
        await self._drain_log()
        return code

    async def stop(self, grace: float = 5.0, kill_wait: float = 5.0) -> int | None:
        """Stop the process; idempotent, shielded from cancellation, bounded in time.

        The same for a backend that runs and for one that already exited on its
        own (during its start, or a crash): its client, leftover children and
        pid record go in every case.

        1. close this backend's HTTP client;
        2. SIGTERM to the process group (if the leader still runs);
        3. wait up to ``grace`` seconds for it to exit;
        4. SIGKILL to the process group, wait up to ``kill_wait`` seconds and reap;
        5. SIGKILL to the group again, for children left by a leader that is gone, and wait
           (at most 1 s) until none of them runs (zombies aside: the init process reaps those);
        6. once reaped: drop the pid record and forget the process (see :func:`kill_owned`).
        """
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(1.0):
                await self.client.aclose()
            if self.returncode is None:
                self._signal_group(signal.SIGTERM)
                with anyio.move_on_after(grace):
                    await self.wait_exit()
            if self.returncode is None:
                log.warning("[%s] pid %d ignored SIGTERM for %g s; killing it", self.model, self.pid, grace)
                self._signal_group(signal.SIGKILL)
                with anyio.move_on_after(kill_wait):
                    await self.wait_exit()
            if self._signal_group(signal.SIGKILL):  # leftovers of the group (or an unreaped leader)
                await anyio.to_thread.run_sync(_wait_group_dead, self.pid, 1.0)
                await self._drain_log()  # the log pipe closed when the last of them died
            self._forget_if_reaped()
            log.info("[%s] pid %d stopped (%s)", self.model, self.pid, self.returncode)
        return self.returncode

    def kill_now(self) -> None:
        """SIGKILL the group and reap without the loop (for atexit and finalizers); forget it once reaped."""
        self._signal_group(signal.SIGKILL)
        try:
            self._popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        self._forget_if_reaped()

    def _forget_if_reaped(self) -> None:
        # A backend that could not be reaped keeps its record (a later router reaps it) and its
        # place in the registry (kill_owned tries again).
        if self.returncode is None:
            return
        _pidfile.remove(self._record)
        with _live_lock:
            mine = _live.get(self.owner, {})
            if mine.get(self.pid) is self:
                del mine[self.pid]
            if not mine:
                _live.pop(self.owner, None)

    def _signal_group(self, sig: signal.Signals) -> bool:
        """Send ``sig`` to the backend's process group; whether the group still existed."""
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def _running_members(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that are not zombies (read from Linux's /proc; [] elsewhere)."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rfind(b")") + 2:].split(maxsplit=3)[:3]
        if int(pgrp) == pgid and state not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def _wait_group_dead(pgid: int, timeout: float) -> bool:
    """Wait (blocking, up to ``timeout`` s) until no process of group ``pgid`` runs."""
    deadline = time.monotonic() + timeout
    while _running_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True
