"""A controllable stand-in backend for timing-sensitive tests (never the only proof).

    python fake_server.py --port P [--gate FILE] [--exit-at-start CODE] [--ignore-term]

/health answers 503 until FILE exists (no --gate: at once), then 200.
/v1/completions answers a fixed text; SSE when "stream" is true.
Environment: FAKE_TOKEN_DELAY (seconds between streamed pieces), FAKE_FIRST_DELAY (seconds
before the first one), FAKE_BODY_TRICKLE (seconds between the bytes of a whole answer, sent in
8 pieces).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--gate")
    p.add_argument("--exit-at-start", type=int)
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--model")
    p.add_argument("--ctx-size")
    args, _ = p.parse_known_args()
    print(f"fake backend pid {os.getpid()} port {args.port}", flush=True)
    if args.exit_at_start is not None:
        print("fatal: refusing to start (as asked)", flush=True)
        sys.exit(args.exit_at_start)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            ready = not args.gate or os.path.exists(args.gate)
            self.send_response(200 if ready else 503)
            self.end_headers()
            self.wfile.write(b'{"status":"ok"}' if ready else b'{"status":"loading"}')

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            words = ["fake", " text", " from", " the", " stand-in"]
            if body.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                self.wfile.flush()
                time.sleep(float(os.environ.get("FAKE_FIRST_DELAY", "0")))
                for w in words:
                    chunk = {"choices": [{"text": w, "delta": {"content": w}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(float(os.environ.get("FAKE_TOKEN_DELAY", "0")))
                self.wfile.write(b"data: [DONE]\n\n")
                return
            out = {"choices": [{"text": "".join(words), "message": {"content": "".join(words)},
                                "finish_reason": "stop"}], "usage": {}}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            trickle = float(os.environ.get("FAKE_BODY_TRICKLE", "0"))
            step = max(1, len(data) // 8)
            for i in range(0, len(data), step):
                self.wfile.write(data[i:i + step])
                self.wfile.flush()
                time.sleep(trickle)

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
