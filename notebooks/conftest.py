"""nbval runs these notebooks in kernels that inherit this process's environment, so whatever a
notebook reaches starts here, before any kernel does, and its address goes into the environment:

* the demo Hub (a local stand-in for the Hugging Face Hub, tests/hubstub.py): ``HF_ENDPOINT``
  points at it, so notebooks/models.ipynb pulls offline;
* the demo "GPU box" of notebooks/remote.ipynb (``tests.remotes.session_demo_remote``): a
  ``lemon-magic serve`` process with config and state dirs of its own, its URL in
  ``LEMON_MAGIC_DEMO_REMOTE``; the kernels' router keeps its own config dir.

Both stop in ``pytest_unconfigure``.
"""

from __future__ import annotations

import pytest

from tests.hubstub import close_session_demo_hub, session_demo_hub
from tests.remotes import close_session_demo_remote, session_demo_remote


def pytest_configure(config: pytest.Config) -> None:
    session_demo_hub()
    try:
        session_demo_remote()
    except BaseException:
        close_session_demo_hub()
        raise


def pytest_unconfigure(config: pytest.Config) -> None:
    try:
        close_session_demo_remote()
    finally:
        close_session_demo_hub()
