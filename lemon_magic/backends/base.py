"""The small interface every backend kind implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from lemon_magic.errors import InvalidOptions
from lemon_magic.options import ResolvedOptions

__all__ = ("Backend",)


class Backend(ABC):
    """A kind of backend process serving an OpenAI-style API on 127.0.0.1.

    Subclasses say how to find the program, how to build its argv and where
    to poll for readiness; the supervisor in ``_process`` does the rest.
    """

    #: the name users pass as ``backend=``
    name: str
    #: GET path that answers 200 once the model is loaded
    health_path: str
    #: flags that lemon_magic sets itself and users may not pass in ``extra_args``
    reserved_flags: frozenset[str]
    #: log text that means "the port was taken": the start is retried on a new port
    port_in_use_markers: tuple[str, ...] = ("address already in use",)

    @abstractmethod
    def command(self) -> list[str]:
        """The program (and fixed leading args) to run.

        :raises BackendUnavailable: the program is missing or not runnable.
        """

    def environment(self) -> dict[str, str] | None:
        """The environment the process gets (``None``: this process's own)."""
        return None

    def key_environment(self, key: str) -> dict[str, str]:
        """The variables that make the process require ``key`` from every client (issue 21).

        Each process gets a fresh key that only the router holds, so a local user or a web
        page (DNS rebinding) cannot use the backend around the router's checks. It goes in
        the environment, never on the command line (``/proc/<pid>/cmdline`` is readable by
        every local user; ``/proc/<pid>/environ`` only by the same user). ``{}``: this kind
        of backend takes no key.
        """
        return {}

    def workdir(self) -> Path | None:
        """The folder the process starts in (``None``: this process's own)."""
        return None

    def available(self) -> bool:
        """Whether :meth:`command` would succeed."""
        try:
            self.command()
        except Exception:
            return False
        return True

    @abstractmethod
    def argv(self, model_path: Path, options: ResolvedOptions, port: int) -> list[str]:
        """The full argv that serves ``model_path`` with ``options`` on ``port``."""

    def kind_args(self, kind: str, options: ResolvedOptions) -> list[str]:
        """Flags that make the backend serve a model of ``kind`` (``"embedding"`` models
        need their endpoint switched on), unless ``options.extra_args`` already has them."""
        return []

    def check_extra_args(self, args: tuple[str, ...]) -> None:
        """Refuse extra args that name a flag lemon_magic sets itself.

        :raises InvalidOptions: naming the first reserved flag found.
        """
        for arg in args:
            flag = arg.split("=", 1)[0]
            if flag in self.reserved_flags:
                raise InvalidOptions(f"extra_args may not set {flag}: lemon_magic sets it "
                                     f"(use the matching load option instead)")
