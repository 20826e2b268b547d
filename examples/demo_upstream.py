"""A small OpenAI-compatible upstream for the local gateway and the end-to-end tests; no internet.

``POST /v1/chat/completions`` answers with the last user message echoed back (streamed as
server-sent events when ``"stream": true``), so what a chain changes on the way in and out is
visible. ``GET /_demo/requests`` lists the requests it received (method, path, headers, body),
so tests can prove what reached the upstream and what never did.

A stream is sent as an LLM sends one: chunked, an event per word, as they are "generated". Tests
shape it with request headers: ``x-demo-delay`` (seconds between events), ``x-demo-repeat``
(say the answer N times), ``x-demo-chunking: split`` (cut every event in two network chunks) or
``merge`` (two events per chunk), ``x-demo-extra-events: 1`` (a comment and an event type no
gateway knows, between the words). ``x-demo-wait`` (seconds) holds any answer back that long, as
an upstream slower than the gateway's route timeout does.

    python examples/demo_upstream.py --port 8000
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "demo-model"


class DemoUpstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without this, each body waits ~40 ms for the
    # client's delayed ACK on a kept-alive connection, as no production server makes it wait.
    disable_nagle_algorithm = True
    received: list[dict] = []
    lock = threading.Lock()

    def log_message(self, format: str, *args) -> None:  # keep the gateway's terminal readable
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/_demo/requests":
            with self.lock:
                self._send(200, json.dumps(self.received).encode())
        elif self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode())
        else:
            self._send(404, json.dumps({"error": {"message": f"no route {self.path}", "type": "not_found"}}).encode())

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        with self.lock:
            self.received.append({
                "method": "POST", "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": raw.decode("utf-8", "replace"),
            })
        if self.headers.get("x-demo-wait"):
            time.sleep(float(self.headers["x-demo-wait"]))
        if self.path.startswith("/status/"):
            code = int(self.path.rsplit("/", 1)[1])
            self._send(code, json.dumps({"error": {"message": f"upstream says {code}", "type": "upstream"}}).encode())
            return
        try:
            request = json.loads(raw or b"{}")
            last = next((m.get("content") for m in reversed(request.get("messages", [])) if m.get("role") == "user"), "")
        except (ValueError, AttributeError):
            self._send(400, json.dumps({"error": {"message": "body is not JSON", "type": "invalid_request_error"}}).encode())
            return
        text = f"You said: {last}" if isinstance(last, str) else "You sent structured content."
        if request.get("stream"):
            self._stream(text, request)
            return
        prompt_tokens, completion_tokens = len(str(last).split()), len(text.split())  # words stand in for tokens
        completion = {
            "id": f"chatcmpl-demo-{int(time.time() * 1000)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", MODEL),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        self._send(200, json.dumps(completion).encode())

    def _stream(self, text: str, request: dict) -> None:
        created, ident = int(time.time()), f"chatcmpl-demo-{int(time.time() * 1000)}"

        def chunk(delta: dict, finish_reason: str | None = None, **extra: object) -> str:
            choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": MODEL, "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        text = " ".join([text] * int(self.headers.get("x-demo-repeat") or 1))
        words = text.split(" ")
        events = [chunk({"role": "assistant", "content": ""})]
        for number, word in enumerate(words):
            events.append(chunk({"content": word + (" " if number + 1 < len(words) else "")}))
            if self.headers.get("x-demo-extra-events") and number == 0:
                events.append(": keep-alive\n\n")
                events.append('event: demo.progress\ndata: {"type": "demo.progress", "words": 1}\n\n')
        events.append(chunk({}, "stop"))
        if (request.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 3, "completion_tokens": len(words), "total_tokens": 3 + len(words)}
            events.append(f"data: {json.dumps({'id': ident, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n")
        events.append("data: [DONE]\n\n")
        chunks = [event.encode() for event in events]
        chunking = self.headers.get("x-demo-chunking")
        if chunking == "split":
            chunks = [part for c in chunks for part in (c[: len(c) // 2], c[len(c) // 2:])]
        elif chunking == "merge":
            chunks = [b"".join(chunks[i:i + 2]) for i in range(0, len(chunks), 2)]
        delay = float(self.headers.get("x-demo-delay") or 0)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for number, data in enumerate(chunks):
                if delay and number:
                    time.sleep(delay)
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client (or the gateway) hung up: nothing more to send


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), DemoUpstream)
    server.daemon_threads = True
    print(f"demo upstream listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
