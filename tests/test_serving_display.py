"""``%lemon_status`` and the panel say that the kernel serves HTTP, where, and how many
requests it has answered; on a real server bound to a free port."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import httpx
import pytest
from IPython.core.interactiveshell import InteractiveShell

from lemon_magic import Router, get_router
from lemon_magic.widgets import LemonPanel
from tests.fakes import FakeBackend

pytestmark = pytest.mark.real


def test_status_says_where_the_kernel_serves_and_how_many_requests(ip: InteractiveShell) -> None:
    assert get_router().serving is None
    assert repr(ip.run_line_magic("lemon_status", "")) == "no models loaded yet"
    ip.run_line_magic("lemon_serve", "--port 0")
    url = get_router().base_url
    assert url is not None and re.fullmatch(r"http://127\.0\.0\.1:\d+/api/v1", url)
    for _ in range(3):
        assert httpx.get(url + "/health").status_code == 200
    info = get_router().serving
    assert info is not None and info.base_url == url and info.requests_served == 3

    table = ip.run_line_magic("lemon_status", "")
    assert repr(table).splitlines() == [f"serving {url} — 3 requests", "no models loaded yet"]
    assert f"<p>serving {url} — 3 requests</p>" in table._repr_html_()

    ip.run_line_magic("lemon_serve", "--stop")
    assert get_router().serving is None
    assert repr(ip.run_line_magic("lemon_status", "")) == "no models loaded yet"


@pytest.fixture
def served_panel(make_router: Callable[..., Router]) -> Iterator[tuple[Router, LemonPanel]]:
    router = make_router(backends={"fake": FakeBackend()})
    panel = LemonPanel(router)
    panel.wait_idle()
    yield router, panel
    panel.close()
    router.stop_serving()


def test_panel_header_says_where_the_kernel_serves(served_panel: tuple[Router, LemonPanel],
                                                   tiny_model: str) -> None:
    router, panel = served_panel
    assert "serving" not in panel.header.value
    url = router.serve("127.0.0.1", 0)
    assert httpx.get(url + "/health").status_code == 200
    router.load(tiny_model, backend="fake")  # an event: the panel refreshes its header
    panel.wait_until(lambda p: f"serving {url} (1 request)" in p.header.value, timeout=10)
    assert panel.header.value.startswith("<b>lemon_magic</b> — 1 model(s), 1 running — serving http://")

    assert router.stop_serving()
    router.unload(tiny_model)
    panel.wait_until(lambda p: "serving" not in p.header.value, timeout=10)
