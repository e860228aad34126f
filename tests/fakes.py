"""The fake backend kind and a deliberately racy router, for the tests only."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import anyio

from lemon_magic import LoadOptions, ModelNotLoaded
from lemon_magic._policy import ModelState
from lemon_magic._records import LoadResult
from lemon_magic.backends.base import Backend
from lemon_magic.options import ResolvedOptions
from lemon_magic.router import AsyncRouter

SERVER = Path(__file__).with_name("fake_server.py")


class FakeBackend(Backend):
    """Runs ``fake_server.py``; ``gate`` holds it unhealthy until the file exists."""

    name = "fake"
    health_path = "/health"
    reserved_flags = frozenset({"--port", "--model"})

    def __init__(self, gate: Path | None = None, exit_at_start: int | None = None,
                 ignore_term: bool = False) -> None:
        self.gate, self.exit_at_start, self.ignore_term = gate, exit_at_start, ignore_term

    def command(self) -> list[str]:
        return [sys.executable, str(SERVER)]

    def argv(self, model_path: Path, options: ResolvedOptions, port: int) -> list[str]:
        argv = [*self.command(), "--port", str(port), "--model", str(model_path),
                "--ctx-size", str(options.ctx_size)]
        if self.gate:
            argv += ["--gate", str(self.gate)]
        if self.exit_at_start is not None:
            argv += ["--exit-at-start", str(self.exit_at_start)]
        if self.ignore_term:
            argv.append("--ignore-term")
        return [*argv, *options.extra_args]


class RacyRouter(AsyncRouter):
    """Lemonade before PR #1604: "loaded?", "unload" and "load" as three separately locked steps.

    Used only to show that the race tests can fail.
    """

    async def ensure_loaded(self, model: str, options: LoadOptions | None = None, *,
                            explicit: bool = True, pin: bool | None = None,
                            _acquire: bool = False) -> LoadResult:
        spec = await self._spec(model)
        wanted = self.resolve(spec, options or LoadOptions())
        m = self._models.get(spec.name)
        # step 1: "is it loaded with these options?" -- a status read that gates a mutation
        if m is not None and m.state is ModelState.READY and (not explicit or m.options == wanted):
            return await super().ensure_loaded(model, options, explicit=explicit, pin=pin,
                                               _acquire=_acquire)
        # the gap between separately locked steps (in Lemonade: separate calls), with jitter
        await anyio.sleep(random.uniform(0, 0.02))
        # step 2: "unload" whatever is there now (a separately locked step)
        m = self._models.get(spec.name)
        if m is not None and m.state in (ModelState.READY, ModelState.LOADING):
            try:
                await self.unload(model)
            except ModelNotLoaded:
                pass
        # step 3: "load"
        return await super().ensure_loaded(model, options, explicit=True, pin=pin, _acquire=_acquire)


