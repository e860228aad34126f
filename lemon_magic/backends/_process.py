"""The shared process supervisor: spawn, log ring, readiness, exit watch, stop.

Every backend runs in its own session (``start_new_session=True``): the
notebook's Stop button signals the kernel's whole process group and would
otherwise kill it. So we clean up ourselves: ``PR_SET_PDEATHSIG`` kills the
backend when the thread that spawned it dies (we spawn from the router's
long-lived loop thread), and a pid record lets a later router reap backends
left by a process that was killed outright.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

import anyio
import httpx

from lemon_magic.backends import _pidfile
from lemon_magic.errors import BackendExited, BackendStartError, HealthCheckTimeout

__all__ = ("BackendProcess", "free_port")

log = logging.getLogger("lemon_magic.backends")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True) \
    if sys.platform.startswith("linux") else None
# Polling interval for readiness: starts short, grows, stays small so that
# we notice "healthy" within a few ms of the backend (see bench/).
_POLL_FIRST, _POLL_GROWTH, _POLL_MAX = 0.002, 1.5, 0.015


_ssl_context: ssl.SSLContext | None = None


def _client(timeout: float) -> httpx.AsyncClient:
    """An HTTP client for one backend (httpx builds an SSL context per client: share one)."""
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    # No keep-alive: llama-server may close an idle connection just as we reuse it
    # ("Server disconnected without sending a response"), and it delays its exit on
    # SIGTERM while one is open. A loopback connect costs well under a millisecond.
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=5.0), verify=_ssl_context,
                             trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))


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


class _LogRing:
    """The last ``maxlen`` lines of a backend's stdout+stderr, filled by a daemon thread."""

    def __init__(self, stream: IO[bytes], maxlen: int, name: str) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=maxlen)
        self.total = 0
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True,
                                        name=f"lemon-log-{name}")
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                self.lines.append(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                self.total += 1

    def tail(self, n: int) -> list[str]:
        return list(self.lines)[-n:] if n > 0 else []

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class BackendProcess:
    """One running backend process and everything needed to supervise it.

    Create it with :meth:`spawn` from the router's loop thread.
    """

    def __init__(self, model: str, argv: Sequence[str], port: int, popen: subprocess.Popen[bytes],
                 log_lines: int, request_timeout: float) -> None:
        self.model = model
        self.argv = tuple(argv)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.started_at = time.monotonic()
        self._popen = popen
        assert popen.stdout is not None
        self._log = _LogRing(popen.stdout, log_lines, f"{model}-{popen.pid}")
        self._record = _pidfile.record(popen.pid, self.argv)
        #: the client for this backend only (closed before SIGTERM)
        self.client = _client(request_timeout)

    @classmethod
    def spawn(cls, model: str, argv: Sequence[str], port: int, *, env: dict[str, str] | None = None,
              log_lines: int = 400, request_timeout: float = 600.0) -> BackendProcess:
        """Start ``argv`` (never through a shell) in its own session with PDEATHSIG set.

        :raises BackendStartError: the program could not be executed.
        """
        parent = os.getpid()
        try:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                     close_fds=True,
                                     preexec_fn=lambda: _child_setup(parent))
        except OSError as exc:
            raise BackendStartError(f"cannot start the backend of {model!r}: {argv[0]}: "
                                    f"{exc.strerror or exc}", model=model) from exc
        log.info("[%s] spawned pid %d on port %d: %s", model, popen.pid, port, " ".join(argv))
        return cls(model, argv, port, popen, log_lines, request_timeout)

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

        1. SIGTERM to the process group;
        2. wait up to ``grace`` seconds for it to exit;
        3. SIGKILL to the process group;
        4. wait up to ``kill_wait`` seconds and reap; drop the pid record.
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
            self._signal_group(signal.SIGKILL)  # leftovers of the group, if any
            _pidfile.remove(self._record)
            log.info("[%s] pid %d stopped (%s)", self.model, self.pid, self.returncode)
        return self.returncode

    def kill_now(self) -> None:
        """SIGKILL the group and reap without waiting on the loop (for atexit and finalizers)."""
        self._signal_group(signal.SIGKILL)
        try:
            self._popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        _pidfile.remove(self._record)

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
