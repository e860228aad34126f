"""Model name → spec → resolved options, memoised, and invalidated when the registry changes.

The router owns one :class:`Resolver`. Registration goes through the router,
which calls :meth:`Resolver.invalidate`; a registrations file changed by
another process is noticed too, because every cache is keyed on the
registry's :meth:`~lemon_magic.registry.Registry.generation` (one ``stat``).
The model file's path is part of the resolved options, so a name registered
anew to another file compares as different options (an explicit load reloads).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import anyio
import anyio.to_thread

from lemon_magic._templates import resolve_template
from lemon_magic.backends import Backend
from lemon_magic.errors import BackendUnavailable, InvalidOptions
from lemon_magic.options import DEFAULT_CTX_SIZE, LoadOptions, ResolvedOptions, default_threads
from lemon_magic.registry import ModelSpec, Registry

__all__ = ("Resolver",)

_MEMO_LIMIT = 512


@dataclass(eq=False)
class _Flight:
    """A name being resolved in a worker thread, shared by concurrent callers."""

    done: anyio.Event = field(default_factory=anyio.Event)
    spec: ModelSpec | None = None  # None once done: it failed


class Resolver:
    """Resolves names and options for one router; used on the router's loop only."""

    def __init__(self, registry: Registry, backends: Mapping[str, Backend]) -> None:
        self.registry = registry
        self.backends = backends
        self._threads = default_threads()
        self._default_backend: str | None = None
        self._generation = registry.generation()
        self._specs: dict[str, ModelSpec] = {}
        self._flights: dict[str, _Flight] = {}
        self._options: dict[tuple[ModelSpec, LoadOptions, LoadOptions], ResolvedOptions] = {}

    def invalidate(self) -> None:
        """Forget every cached spec and resolution (the registry changed)."""
        self._specs.clear()
        self._options.clear()
        self._generation = self.registry.generation()

    def _check_generation(self) -> None:
        if self.registry.generation() != self._generation:
            self.invalidate()

    def cached_spec(self, name: str) -> ModelSpec | None:
        """The spec of ``name`` if it is cached and the registry has not changed (no I/O but
        one ``stat``): the no-op fast path uses it."""
        self._check_generation()
        return self._specs.get(name)

    async def spec(self, name: str) -> ModelSpec:
        """The spec of ``name``, validated; resolved in a worker thread (the first use of the
        embedded model assembles 253 MB), once for any number of concurrent callers.

        :raises LemonError: unknown name, or a file that is missing or not GGUF.
        """
        cached = self.cached_spec(name)
        if cached is not None:
            return cached
        flight = self._flights.get(name)
        if flight is None:
            flight = self._flights[name] = _Flight()
            generation = self._generation
            try:
                flight.spec = await anyio.to_thread.run_sync(self.registry.resolve, name)
                if generation == self._generation:  # not invalidated meanwhile
                    self._specs[name] = flight.spec
            finally:
                del self._flights[name]
                flight.done.set()
            return flight.spec
        await flight.done.wait()
        if flight.spec is None:  # the shared resolution failed: try on our own
            return await anyio.to_thread.run_sync(self.registry.resolve, name)
        return flight.spec

    def backend(self, name: str) -> Backend:
        """The backend kind called ``name``.

        :raises InvalidOptions: no such backend.
        """
        try:
            return self.backends[name]
        except KeyError:
            raise InvalidOptions(f"backend must be one of {', '.join(self.backends)} or 'auto', "
                                 f"got {name!r}") from None

    def default_backend(self) -> str:
        """The first backend kind that is available here (chosen once per router)."""
        if self._default_backend is not None:
            return self._default_backend
        for name, backend in self.backends.items():
            if backend.available():
                self._default_backend = name
                return name
        raise BackendUnavailable("no backend is available: build llama-server with 'python -m "
                                 "lemon_magic.build_llama_server' or pip install "
                                 "'llama-cpp-python[server]'")

    def resolve(self, spec: ModelSpec, requested: LoadOptions,
                defaults: LoadOptions) -> ResolvedOptions:
        """Fill in defaults and make "auto" concrete, in this order: the request, the model's
        registration, ``defaults`` (the router's setting), then built-in defaults.

        :raises InvalidOptions: a value the model or backend cannot take.
        """
        key = (spec, requested, defaults)
        cached = self._options.get(key)
        if cached is not None:
            return cached
        if len(self._options) > _MEMO_LIMIT:
            self._options.clear()
        opts = requested.merged_over(spec.defaults).merged_over(defaults)
        info = spec.info
        backend = opts.backend or self.default_backend()
        ctx = opts.ctx_size or min(DEFAULT_CTX_SIZE, info.context_length or DEFAULT_CTX_SIZE)
        if info.context_length and ctx > info.context_length:
            raise InvalidOptions(f"ctx_size {ctx} exceeds the training context of {spec.name!r} "
                                 f"({info.context_length} tokens)")
        extra = opts.extra_args or ()
        self.backend(backend).check_extra_args(extra)
        resolved = ResolvedOptions(backend=backend, ctx_size=ctx,
                                   threads=opts.threads or self._threads, extra_args=extra,
                                   chat_template=resolve_template(opts.chat_template),
                                   model_path=str(spec.path))
        self._options[key] = resolved
        return resolved
