"""nbval runs these notebooks in kernels that inherit this process's environment: the demo Hub
(a local stand-in for the Hugging Face Hub, tests/hubstub.py) starts before any kernel does, and
``HF_ENDPOINT`` points at it, so notebooks/models.ipynb pulls offline."""

from __future__ import annotations

import pytest

from tests.hubstub import close_session_demo_hub, session_demo_hub


def pytest_configure(config: pytest.Config) -> None:
    session_demo_hub()


def pytest_unconfigure(config: pytest.Config) -> None:
    close_session_demo_hub()
