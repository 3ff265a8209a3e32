"""serve.py's user errors and edge cases, each one sentence: a flag refused before the model loads (exit 2), a
socket that cannot listen, a request the HTTP side cannot read (400, 411, 413), messages or fields the API
refuses (400); and what used to fail instead of serving: the base alone with the default flags, and a DoRA
adapter, whose greedy completions equal generate() with that adapter loaded alone, beside the base's and a
LoRA adapter's requests.
"""

import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_serve import hold_scheduler, make_adapter, one_sentence_error, post, serve_cli

from minilora.dtypes import resolve_dtype
from minilora.lora import apply_lora, load_adapter, save_adapter
from minilora.models.generate import generate
from minilora.models.loader import load_model
from minilora.serve.api import MAX_BODY_BYTES

PROMPT = "Q: 2+2?"
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0}


def start(flags: list[str]):
    server = serve_cli.Server(serve_cli.serve_parser().parse_args(flags))
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread) -> None:
    server.httpd.shutdown()
    server.close()
    thread.join(5)


@pytest.fixture(scope="module")
def base_app(tmp_path_factory):
    """serve.py with its defaults (no --adapter, no --dtype) in a folder without runs/demo: the tiny base alone."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("no_demo"))
        server, thread = start(["--port", "0"])
    yield server
    stop(server, thread)


def make_dora(path, seed=5):
    model, _ = load_model("tiny", quantize=None, dtype=torch.float32)
    apply_lora(model, targets=["q_proj", "v_proj", "lm_head"], r=4, alpha=8, dropout=0.0, verbose=False, use_dora=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_A" in n or ".lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))  # B != 0: the text changes (test_serve.py says why)
    save_adapter(model, str(path), base_model_name_or_path="tiny")
    return str(path)


@pytest.fixture(scope="module")
def dora_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_dora")
    return {"dora": make_dora(tmp / "dora"), "a": make_adapter(tmp / "a", ["q_proj", "v_proj", "lm_head"], 4, 8, 1)}


@pytest.fixture(scope="module")
def dora_app(dora_dirs):
    flags = ["--port", "0", "--dtype", "float32", "--quantize", "none", "--max-batch", "8"]
    server, thread = start(flags + [f for n, d in dora_dirs.items() for f in ("--adapter", f"{n}={d}")])
    yield server
    stop(server, thread)


def alone(adapter_dir: str | None, prompt: str, n: int) -> str:
    """generate()'s greedy text with the adapter loaded alone, without a name (None: the base)."""
    model, tok = load_model("tiny", quantize=None, dtype=torch.float32)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    ids = tok.encode(prompt, add_special_tokens=True)
    return tok.decode(generate(model.eval(), [ids], n, eos_ids=tok.eos_ids, pad_id=tok.pad_id)[0])


def refused_at_start(capsys, *flags) -> str:
    """serve.py's one line on stderr for flags it refuses with exit 2."""
    assert serve_cli.main(list(flags)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


# ------------------------------------------------------------------ the base alone, and flags
def test_the_base_alone_serves_in_the_dtype_train_picks_for_auto(base_app):
    assert base_app.scheduler.served() == {}
    assert base_app.scheduler.dtype == resolve_dtype("auto", base_app.scheduler.device.type)
    status, body = post(base_app, "/v1/completions", COMPLETION)
    assert status == 200 and body["choices"][0]["text"], body


def test_a_model_that_is_not_there_gets_the_loaders_sentence(capsys):
    with pytest.raises(ValueError) as want:
        load_model("nope", quantize=None)
    assert refused_at_start(capsys, "--model", "nope", "--port", "0") == f"error: {want.value}"


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the refusal must come first."""
    import minilora.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model loaded before the refusal"))


@pytest.mark.parametrize("port", ["-1", "70000"])
def test_a_port_out_of_range_is_refused_before_the_model_loads(capsys, no_model, port):
    err = refused_at_start(capsys, "--port", port)
    assert err == f"error: --port {port} is not a TCP port; pass 0 to 65535 (0: any free port).", err


@pytest.mark.parametrize("grace", ["-1", "nan"])
def test_a_negative_shutdown_grace_is_refused(capsys, no_model, grace):
    err = refused_at_start(capsys, "--shutdown-grace", grace)
    assert err == f"error: --shutdown-grace {grace} must be 0 or more seconds; fix the flag and run again.", err


def test_a_port_in_use_is_told_before_the_model_loads(capsys, no_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = refused_at_start(capsys, "--port", str(port), "--dtype", "float32")
    assert err.startswith(f"error: Cannot listen on 127.0.0.1:{port} (") and "pass another --port" in err, err


def test_a_host_that_is_not_here_is_one_sentence(capsys, no_model, monkeypatch):
    err = refused_at_start(capsys, "--host", "192.0.2.1", "--port", "0")  # TEST-NET-1: no machine has it
    assert err.startswith("error: Cannot listen on 192.0.2.1:0 (") and "pass a --host" in err, err

    def unresolved(self):  # what a name does that no resolver knows, without asking one
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(serve_cli._HTTPServer, "server_bind", unresolved)
    err = refused_at_start(capsys, "--host", "999.1.1.1", "--port", "0")
    assert err.startswith("error: Cannot listen on 999.1.1.1:0 (Name or service not known); pass a --host"), err


# ------------------------------------------------------------------ requests the HTTP side cannot read
def raw_post(app, head: str, body: bytes = b"") -> tuple[int, dict]:
    """(status, JSON) of a POST /v1/completions written as given: `head` header lines, then `body`, then the end
    of the client's input."""
    with socket.create_connection(app.httpd.server_address[:2], timeout=30) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n{head}\r\n".encode() + body)
        s.shutdown(socket.SHUT_WR)
        data = b"".join(iter(lambda: s.recv(65536), b""))
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


BODY = json.dumps(COMPLETION).encode()


@pytest.mark.parametrize(
    "head, body, status, words",
    [
        (f"Content-Length: {len(BODY)}\r\n", BODY, 200, None),  # the control: raw_post itself works
        ("Content-Length: abc\r\n", b"", 400, "Content-Length"),
        ("Content-Length: -1\r\n", b"", 400, "Content-Length"),
        ("Content-Length: 99999999999\r\n", b"", 413, "MiB"),
        (f"Content-Length: {MAX_BODY_BYTES + 1}\r\n", b"", 413, "MiB"),
        ("", BODY, 411, "Content-Length"),
        ("Transfer-Encoding: chunked\r\n", b"", 411, "Content-Length"),
        ("Content-Length: 100\r\n", b"{}", 400, "ended after 2 of the 100 bytes"),
    ],
)
def test_a_body_the_server_cannot_read_is_its_status_with_one_sentence(base_app, head, body, status, words):
    got, answer = raw_post(base_app, head, body)
    assert got == status, answer
    if words is not None:
        assert words in one_sentence_error(answer)


# ------------------------------------------------------------------ messages and fields the API refuses
@pytest.mark.parametrize(
    "messages, words",
    [
        (
            [{"role": "wizard", "content": "x"}],
            "The role 'wizard' of messages[0] is unknown here; send 'system', 'user' or",
        ),
        ([{"role": "assistant", "content": "x"}], "end 'messages' with a user message"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "alternate"),  # the template's words
        ([{"role": "user", "content": [1]}], "a text 'content'"),
    ],
)
def test_messages_the_chat_refuses_get_a_sentence_for_the_client(base_app, messages, words):
    status, body = post(base_app, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 2})
    msg = one_sentence_error(body)
    assert status == 400 and words in msg and msg[0].isupper() and "--" not in msg, msg  # no command-line advice


@pytest.mark.parametrize(
    "path, extra, status, words",
    [
        ("/v1/completions", {"stream": "yes"}, 400, "'stream' must be true or false"),
        ("/v1/completions", {"stream": 1}, 400, "'stream' must be true or false"),
        ("/v1/completions", {"logprobs": 3}, 400, "'logprobs' is not supported"),
        ("/v1/completions", {"logprobs": 0}, 400, "'logprobs' is not supported"),
        ("/v1/completions", {"logprobs": None, "stream": False}, 200, None),
        ("/v1/chat/completions", {"logprobs": True}, 400, "'logprobs' is not supported"),
        ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 2}, 400, "'top_logprobs' is not supported"),
        ("/v1/chat/completions", {"logprobs": False}, 200, None),
    ],
)
def test_fields_that_cannot_be_honoured_are_refused(base_app, path, extra, status, words):
    body = {**COMPLETION, **extra}
    if "chat" in path:
        body = {**{k: v for k, v in body.items() if k != "prompt"}, "messages": [{"role": "user", "content": "hi"}]}
    got, answer = post(base_app, path, body)
    assert got == status, answer
    if words is not None:
        assert words in one_sentence_error(answer)


# ------------------------------------------------------------------ a DoRA adapter
def test_two_dora_adapters_are_refused_in_one_sentence(capsys, no_model, dora_dirs):
    d = dora_dirs["dora"]
    err = refused_at_start(capsys, "--adapter", f"x={d}", "--adapter", f"y={d}", "--port", "0")
    assert "--adapter x and --adapter y are both DoRA adapters" in err and "second serve.py" in err, err


def test_a_dora_adapter_is_served_and_equals_generate_alone(dora_app, dora_dirs):
    """DoRA, LoRA and base requests queued together: the DoRA rows run in batches of their own, and every
    request returns what generate() returns for it alone."""
    with urllib.request.urlopen(dora_app.url + "/v1/models", timeout=30) as r:
        listed = {m["id"]: m["parent"] for m in json.load(r)["data"]}
    assert listed == {"tiny": None, "dora": "tiny", "a": "tiny"}

    want = {"dora": alone(dora_dirs["dora"], PROMPT, 10), "a": alone(dora_dirs["a"], PROMPT, 10)}
    want["tiny"] = alone(None, PROMPT, 10)
    assert len(set(want.values())) == 3, want  # else the comparison could not tell them apart
    jobs = ["dora", "a", "tiny", "dora", "tiny", "dora", "a"]
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    release = hold_scheduler(dora_app)  # all of them wait in the queue, mixed
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(post, dora_app, "/v1/completions", {**body, "model": m}) for m in jobs]
        deadline = time.monotonic() + 30
        while dora_app.scheduler.queue.qsize() < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.02)
        release.set()
        got = [f.result(timeout=60) for f in futures]
    assert [(s, b["choices"][0]["text"]) for s, b in got] == [(200, want[m]) for m in jobs]


def test_a_dora_adapter_loaded_at_run_time_is_refused_then_the_served_one_unloads(dora_app, dora_dirs):
    status, body = post(dora_app, "/v1/load_lora_adapter", {"lora_name": "d2", "lora_path": dora_dirs["dora"]})
    msg = one_sentence_error(body)
    assert status == 400 and "DoRA" in msg and f"--adapter d2={dora_dirs['dora']}" in msg, msg
    assert post(dora_app, "/v1/unload_lora_adapter", {"lora_name": "dora"})[0] == 200
    status, body = post(dora_app, "/v1/completions", {**COMPLETION, "model": "dora"})
    assert status == 404 and one_sentence_error(body)
    for name, folder in (("a", dora_dirs["a"]), ("tiny", None)):  # the others still answer as alone
        status, body = post(dora_app, "/v1/completions", {**COMPLETION, "model": name, "max_tokens": 6})
        assert (status, body["choices"][0]["text"]) == (200, alone(folder, "hi", 6)), name
