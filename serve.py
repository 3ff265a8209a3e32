"""A small OpenAI-compatible server for one base and several LoRA adapters, for local use and for seeing
how multi-adapter serving works (vLLM is the engine for serving at scale; it loads the same adapters).

    python serve.py                                   # the demo `tiny` base (and runs/demo as "demo" if there)
    python serve.py --model qwen2.5-0.5b-instruct --adapter sql=runs/sql --adapter chat=runs/chat/adapter
    python serve.py --model qwen2.5-0.5b-instruct --adapter dora=runs/dora   # a DoRA adapter: one per server
    curl localhost:8000/v1/completions -d '{"model": "sql", "prompt": "...", "max_tokens": 32, "temperature": 0}'

Endpoints (OpenAI's and vLLM's shapes; `model` is an adapter name or the base id):
  GET  /v1/models                  the base, and each adapter with parent = the base id
  POST /v1/completions             prompt -> text;   "stream": true sends server-sent events
  POST /v1/chat/completions        messages rendered as minilora renders training prompts (the run's
                                   template: the checkpoint's chat template, or raw)
  POST /v1/load_lora_adapter       {"lora_name", "lora_path"}: a run directory or a PEFT adapter folder
  POST /v1/unload_lora_adapter     {"lora_name"}: hidden at once, deleted when its running requests end
Errors are {"error": {"message": one sentence, "type", "param", "code"}} with 400, 404, 411 (a body
without Content-Length), 413 (a body over MAX_BODY_BYTES), 429 (the queue is full), 500 or 503 (shutting
down).

A DoRA adapter's magnitude rescales whole rows of W0, so it cannot share a batch row by row: it is loaded
as the model's own adapter, and its requests run in batches of their own (minilora/serve/scheduler.py).

Threads: http.server's ThreadingHTTPServer gives each connection a thread that parses the request,
queues it (minilora/serve/scheduler.py), and writes the text the scheduler thread hands it; the
scheduler thread alone runs the model, batching every running request into one step. SIGTERM or
Ctrl-C: stop accepting, refuse what waits (503), let the running requests finish for --shutdown-grace
seconds (a second signal cancels them), close the socket, exit 0.

The standard library only: nothing to install beyond minilora, and the HTTP side reads in this one file
(requests are parsed in minilora/serve/api.py, batched in minilora/serve/scheduler.py).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from minilora import DEMO_RUN
from minilora.cli import UsageError, parser, resolve_device, run_main
from minilora.serve.api import content_length, parse_request
from minilora.serve.scheduler import Request, Scheduler, ServeError


def serve_parser() -> argparse.ArgumentParser:
    p = parser(
        "serve.py",
        "Serve a base and its LoRA adapters over an OpenAI-compatible HTTP API, batching requests of "
        "different adapters together.",
        epilog="exit codes: 0 stopped by SIGTERM/Ctrl-C; 2 a user error (one sentence on stderr).",
    )
    a = p.add_argument
    a("--model", default="tiny", help="base model: a preset, an org/name repo or a local folder")
    a(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an adapter to serve (run dir or adapter folder); repeat",
    )
    a("--host", default="127.0.0.1", help="address to listen on")
    a("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    a("--max-batch", type=int, default=16, help="requests decoded together in one step")
    a("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 429")
    a(
        "--max-prefill-tokens",
        type=int,
        default=4096,
        help="padded prompt tokens prefilled in one forward (newcomers join together up to it; bounds its memory)",
    )
    a("--max-new-tokens", type=int, default=256, help="tokens generated when a request gives no max_tokens")
    a(
        "--quantize",
        choices=["nf4", "none"],
        default=None,
        help="base weights (default: as the first adapter's run trained, else none)",
    )
    a(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default=None,
        help="compute dtype (default: the run's, else auto)",
    )
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--shutdown-grace", type=float, default=10.0, help="seconds running requests may finish after SIGTERM")
    return p


def check_flags(args) -> None:
    """UsageError in one sentence for a flag that cannot work, before anything loads."""
    for flag, value in (
        ("--max-batch", args.max_batch),
        ("--max-queue", args.max_queue),
        ("--max-prefill-tokens", args.max_prefill_tokens),
        ("--max-new-tokens", args.max_new_tokens),
    ):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1; fix the flag and run again.")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port; pass 0 to 65535 (0: any free port).")
    if not args.shutdown_grace >= 0:  # NaN too
        raise UsageError(
            f"--shutdown-grace {args.shutdown_grace:g} must be 0 or more seconds; fix the flag and run again."
        )


def serve_dtype(flag: str | None, first_run: dict, device):
    """--dtype when given, else the dtype the first adapter's run trained in, else what train.py's
    --dtype auto picks on this device."""
    from minilora.dtypes import resolve_dtype, run_dtype

    if flag is None and first_run:
        return run_dtype(first_run)
    return resolve_dtype(flag or "auto", device.type)


class _HTTPServer(ThreadingHTTPServer):
    # the listen backlog: socketserver's 5 makes the sixth of many simultaneous connections wait for a
    # TCP retry (1 s, 3 s, 7 s, ...) whenever the accepting thread is slow to run, before its request
    # can even be queued or refused
    request_queue_size = 128


def listen(host: str, port: int) -> _HTTPServer:
    """The server listening on host:port, or a UsageError naming them and what to do."""
    try:
        return _HTTPServer((host, port), Handler)
    except OSError as e:  # socket.gaierror (a host name that does not resolve) is one too
        if e.errno == errno.EADDRINUSE:
            fix = "stop the program listening there or pass another --port (0: any free port)"
        elif e.errno == errno.EACCES:
            fix = "ports below 1024 need privileges; pass --port 1024 or above (0: any free port)"
        elif isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            fix = (
                "pass a --host of this machine: 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or its address"
            )
        else:
            fix = "pass another --host or --port"
        raise UsageError(f"Cannot listen on {host}:{port} ({e.strerror or e}); {fix}.") from None


class Server:
    """The model, its scheduler and the HTTP server around them (serve_forever / close)."""

    def __init__(self, args):
        from minilora.serve import dora_adapter, parse_adapters

        self.args, self.base_id = args, args.model
        adapters = parse_adapters(args.adapter, args.model)
        if not args.adapter and args.model == "tiny" and os.path.isdir(DEMO_RUN):  # the offline demo, as eval.py
            adapters = parse_adapters([f"demo={DEMO_RUN}"], "tiny")
        dora = dora_adapter(adapters)
        self.httpd = listen(args.host, args.port)  # before the model loads: a port in use is told at once
        try:
            self.scheduler = self.load(adapters, dora)
        except BaseException:
            self.httpd.server_close()
            raise
        self.httpd.app = self
        self.handlers = 0  # HTTP threads running, waited for on close
        self.handlers_lock = threading.Lock()
        self.scheduler.start()

    def load(self, adapters: dict[str, tuple[str, dict]], dora: str | None) -> Scheduler:
        """The base, its adapters (the DoRA one, if any, as the model's own), and their scheduler."""
        from minilora.data.encode import resolve_template, run_template
        from minilora.lora import load_adapter
        from minilora.models.loader import load_model

        args = self.args
        first_run = next((cfg for _, cfg in adapters.values() if cfg), {})
        device = resolve_device(args.device)
        quantize = args.quantize or first_run.get("quantize", "none")
        dtype = serve_dtype(args.dtype, first_run, device)
        model, tok = load_model(
            args.model, quantize=None if quantize == "none" else "nf4", dtype=dtype, device=str(device)
        )
        if tok is None:
            raise ValueError(f"{args.model} has no tokenizer.json; the server needs one to read prompts.")
        self.tokenizer, self.context = tok, model.config.max_position_embeddings
        self.templates = {None: resolve_template("auto", tok)}  # adapter name (None: the base) -> chat or raw
        for name in sorted(adapters, key=lambda n: n != dora):  # the model's own adapter before the named ones
            folder, run_cfg = adapters[name]
            load_adapter(model, folder, name=None if name == dora else name)
            self.templates[name] = resolve_template(run_template(run_cfg) if run_cfg else "auto", tok)
        model.eval()  # after loading: an adapter loaded without a name gets new LoRA layers, in training mode
        scheduler = Scheduler(model, tok, args.max_batch, args.max_queue, args.max_prefill_tokens)
        scheduler.adapters = {name: folder for name, (folder, _) in adapters.items()}
        scheduler.solo = dora
        return scheduler

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        """After serve_forever returned: drain the scheduler, let the HTTP threads write their last bytes."""
        self.scheduler.stop(self.args.shutdown_grace)
        deadline = time.monotonic() + 5.0
        while self.handlers and time.monotonic() < deadline:  # every request has its final event by now
            time.sleep(0.02)
        self.httpd.server_close()

    # ------------------------------------------------------------------ requests -> Request
    def resolve_model(self, body: dict) -> str | None:
        """The adapter a request names (None: the base); 404 for anything else."""
        model = body.get("model")
        if not isinstance(model, str):
            raise ServeError(
                400, "The request needs a 'model' string: an adapter name or the base id.", "missing_model"
            )
        if model == self.base_id:
            return None
        if model not in self.scheduler.served():
            raise ServeError(404, f"The model {model!r} does not exist; GET /v1/models lists them.", "model_not_found")
        return model


class Handler(BaseHTTPRequestHandler):
    """One connection: parse, queue, write (JSON or server-sent events)."""

    server_version = "minilora-serve"
    timeout = 60  # seconds a silent client may hold its thread

    @property
    def app(self) -> Server:
        return self.server.app

    def handle(self):
        with self.app.handlers_lock:
            self.app.handlers += 1
        try:
            super().handle()
        finally:
            with self.app.handlers_lock:
                self.app.handlers -= 1

    def send_json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, err: ServeError) -> None:
        kind = (
            "rate_limit_error" if err.status == 429 else "invalid_request_error" if err.status < 500 else "server_error"
        )
        self.send_json(err.status, {"error": {"message": err.message, "type": kind, "param": None, "code": err.code}})

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self.send_error_json(
                ServeError(404, f"There is no GET {self.path}; try GET /v1/models.", "not_found")
            )
        now, base = int(time.time()), self.app.base_id
        entry = lambda name, parent: {
            "id": name,
            "object": "model",
            "created": now,
            "owned_by": "minilora",
            "root": name,
            "parent": parent,
        }
        models = [entry(base, None)] + [entry(n, base) for n in self.app.scheduler.served()]
        self.send_json(200, {"object": "list", "data": models})

    def do_POST(self):
        routes = {
            "/v1/completions": lambda b: self.complete(b, chat=False),
            "/v1/chat/completions": lambda b: self.complete(b, chat=True),
            "/v1/load_lora_adapter": self.load_adapter,
            "/v1/unload_lora_adapter": self.unload_adapter,
        }
        try:
            route = routes.get(self.path.rstrip("/"))
            if route is None:
                raise ServeError(
                    404, f"There is no POST {self.path}; see serve.py's docstring for the endpoints.", "not_found"
                )
            route(self.read_json())
        except ServeError as e:
            self.send_error_json(e)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as e:  # a bug: still one JSON answer, and the traceback in the server's log
            self.log_error("%s", repr(e))
            self.send_error_json(
                ServeError(500, f"The server failed on this request ({type(e).__name__}).", "internal")
            )

    def read_json(self) -> dict:
        length = content_length(self.headers)  # 411, 400 or 413 before a byte is read
        data = self.rfile.read(length)
        if len(data) < length:
            raise ServeError(
                400,
                f"The request body ended after {len(data)} of the {length} bytes of its Content-Length; send it whole.",
                "invalid_json",
            )
        try:
            body = json.loads(data or b"null")
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise ServeError(400, "The request body is not valid JSON; send a JSON object.", "invalid_json") from None
        if not isinstance(body, dict):
            raise ServeError(400, "The request body must be a JSON object.", "invalid_json")
        return body

    # ------------------------------------------------------------------ completions
    def complete(self, body: dict, chat: bool) -> None:
        app = self.app
        adapter = app.resolve_model(body)
        req = parse_request(
            body, chat, adapter, app.tokenizer, app.templates[adapter], app.context, app.args.max_new_tokens
        )
        self.app.scheduler.submit(req)
        first = req.events.get()  # a refusal (404 after an unload, 503) still gets a status of its own
        if first[0] == "error":
            raise first[1]
        kind = "chat.completion" if chat else "text_completion"
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body["model"],
        }
        if body.get("stream"):
            return self.stream(req, first, chat, {**meta, "object": kind + (".chunk" if chat else "")})
        pieces, event = [], first
        while event[0] == "text":
            pieces.append(event[1])
            event = req.events.get()
        if event[0] == "error":
            raise event[1]
        text, (_, reason, n) = "".join(pieces), event
        choice = {"index": 0, "logprobs": None, "finish_reason": reason}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        usage = {"prompt_tokens": len(req.prompt), "completion_tokens": n, "total_tokens": len(req.prompt) + n}
        self.send_json(200, {**meta, "object": kind, "choices": [choice], "usage": usage})

    def stream(self, req: Request, event, chat: bool, meta: dict) -> None:
        """Server-sent events, one OpenAI chunk per piece of text, a last chunk with finish_reason, [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def send(payload) -> None:
            self.wfile.write(f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        def chunk(text: str | None, reason: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return {**meta, "choices": [choice]}

        try:
            if chat:
                send(chunk("", role=True))
            while event[0] == "text":
                send(chunk(event[1]))
                event = req.events.get()
            if event[0] == "error":
                err = event[1]
                send({"error": {"message": err.message, "type": "server_error", "param": None, "code": err.code}})
            else:
                send(chunk(None, reason=event[1]))
            send("[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            req.cancelled = True  # the scheduler drops the row at its next step

    # ------------------------------------------------------------------ adapters at run time
    def load_adapter(self, body: dict) -> None:
        from minilora.data.encode import resolve_template, run_template
        from minilora.lora.layers import AdapterError
        from minilora.serve import adapter_source, check_name, is_dora

        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise ServeError(400, "Loading an adapter needs 'lora_name' and 'lora_path' strings.", "invalid_request")
        try:
            check_name(name, self.app.base_id)
            if name in self.app.scheduler.served():
                raise ValueError(f"An adapter named {name!r} is already loaded; unload it first or pick another name.")
            folder, run_cfg = adapter_source(path, self.app.base_id)
            if is_dora(folder):  # the model's own adapter, chosen when the model loads (the module docstring)
                raise ValueError(
                    f"{path} is a DoRA adapter, which a server loads only at start, one per server; start a "
                    f"serve.py with --adapter {name}={path} to serve it."
                )
            self.app.templates[name] = resolve_template(
                run_template(run_cfg) if run_cfg else "auto", self.app.tokenizer
            )
            self.app.scheduler.load(name, folder)
        except (ValueError, FileNotFoundError, AdapterError) as e:
            raise ServeError(400, str(e), "invalid_adapter") from None
        self.send_text(f"Success: LoRA adapter '{name}' added successfully.")

    def unload_adapter(self, body: dict) -> None:
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise ServeError(400, "Unloading an adapter needs a 'lora_name' string.", "invalid_request")
        self.app.scheduler.unload(name)
        self.send_text(f"Success: LoRA adapter '{name}' removed successfully.")

    def send_text(self, text: str) -> None:  # vLLM answers the adapter endpoints in plain text
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(argv=None) -> int:
    def body() -> int:
        args = serve_parser().parse_args(argv)
        check_flags(args)
        app = Server(args)

        def on_signal(signum, frame):
            if app.scheduler.stop_at is not None:  # a second signal: cancel the running requests now
                app.scheduler.stop_at = 0.0
                app.scheduler.wake.set()
                return
            print(
                f"{signal.Signals(signum).name}: finishing running requests, then stopping", file=sys.stderr, flush=True
            )
            app.scheduler.stop_at = time.monotonic() + args.shutdown_grace  # new requests get 503 from now on
            threading.Thread(target=app.httpd.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        names = ", ".join(app.scheduler.served()) or "none"
        print(f"serving {args.model} (adapters: {names}) on {app.url}", file=sys.stderr, flush=True)
        app.httpd.serve_forever()
        app.close()
        print("stopped", file=sys.stderr, flush=True)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
