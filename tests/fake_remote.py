"""A controllable Lemonade-shaped remote on a real socket, for timing races the real servers cannot
stage on demand (a slow ``/load`` or ``/health``, a refused ``/unload``, a malformed answer, a key).
The real ``lemon-magic serve`` and llama-server remotes are in ``tests/remotes.py``; this one only
makes the moments the router must survive happen when a test wants them."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ("FakeRemote",)


class FakeRemote:
    """``with FakeRemote(load_seconds=3) as fake``: serves model ``m``; ``fake.calls`` records
    ``(method, path)``; ``fake.cfg`` may be changed while it runs."""

    def __init__(self, *, keepalive: bool = True, **cfg: Any) -> None:
        self.cfg: dict[str, Any] = {
            "load_seconds": 0.0, "load_status": 200, "unload_seconds": 0.0, "unload_status": 200,
            "health_seconds": 0.0, "health_body": None, "infer_seconds": 0.0, "key": None,
            "loaded": False, "pid": 4242, "error_text": "load refused here", "infer_status": 200}
        self.cfg.update(cfg)
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keepalive else "HTTP/1.0"  # 1.0: gone when closed

            def _answer(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.record("GET", self.path)
                cfg = fake.cfg
                if self.path.endswith("/models"):
                    return self._answer(200, {"data": [{"id": "m"}]})
                time.sleep(cfg["health_seconds"])
                if cfg["health_body"] is not None:
                    return self._answer(200, cfg["health_body"])
                loaded = [{"model_name": "m", "pid": cfg["pid"], "status": "ready",
                           "recipe_options": {"ctx_size": 256}}] if cfg["loaded"] else []
                return self._answer(200, {"status": "ok", "all_models_loaded": loaded})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                fake.record("POST", self.path)
                cfg = fake.cfg
                if self.path.endswith("/load"):
                    time.sleep(cfg["load_seconds"])
                    if cfg["load_status"] != 200:
                        return self._answer(cfg["load_status"], {"error": cfg["error_text"]})
                    cfg["loaded"], cfg["pid"] = True, cfg["pid"] + 1
                    return self._answer(200, {"status": "success", "action": "loaded",
                                              "pid": cfg["pid"]})
                if self.path.endswith("/unload"):
                    time.sleep(cfg["unload_seconds"])
                    if cfg["unload_status"] != 200:
                        return self._answer(cfg["unload_status"], {"error": "unload failed here"})
                    if not cfg["loaded"]:
                        return self._answer(404, {"error": "model not loaded"})
                    cfg["loaded"] = False
                    return self._answer(200, {"status": "success"})
                if cfg["key"] is not None and self.headers.get("authorization") != f"Bearer {cfg['key']}":
                    return self._answer(401, {"error": {"message": "Invalid API Key"}})
                time.sleep(cfg["infer_seconds"])
                if cfg["infer_status"] != 200:
                    return self._answer(cfg["infer_status"], {"error": {"message": "it broke"}})
                choice = {"index": 0, "text": "hi", "finish_reason": "stop"}
                if not body.get("stream"):
                    return self._answer(200, {"choices": [choice], "usage": {}})
                events = [json.dumps({"choices": [choice]}), "[DONE]"]
                data = "".join(f"data: {e}\n\n" for e in events).encode()
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return None

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.calls.append((method, path))

    def count(self, method: str, suffix: str) -> int:
        with self._lock:
            return sum(1 for m, p in self.calls if m == method and p.endswith(suffix))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeRemote:
        threading.Thread(target=self.server.serve_forever, name="fake-remote", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
