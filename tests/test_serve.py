"""serve.py through the official `openai` client: each adapter's greedy completion and chat completion
equal minilora's generate() with that adapter alone, token for token (the text and the token count);
streamed chunks concatenate to the same text; 16 concurrent requests over 4 adapters, batched into one
step, each return what they return alone; adapters load and unload at run time; every refusal is its
status with one sentence; a full queue answers 429; SIGTERM stops the server with exit code 0.

The adapters. On the tiny base, the token embedding (scaled by sqrt(D)) dominates the residual stream
and Gemma's sandwich norms keep each block's output at unit scale, so adapters on the blocks alone
barely move the greedy argmax (every adapter would print the same text, and the test could not tell them
apart). Each adapter here also targets lm_head with unit-scale random A and B, which moves the logits by
tens: every adapter writes different text.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from minilora.lora import apply_lora, load_adapter, save_adapter
from minilora.models.generate import generate
from minilora.models.loader import load_model

openai = pytest.importorskip("openai")  # a test dependency; a machine without it skips this file with the reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("minilora_serve_cli", os.path.join(ROOT, "serve.py"))
serve_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_cli)

ADAPTERS = {  # name: (target modules, rank, alpha, seed)
    "a": (["q_proj", "v_proj", "lm_head"], 4, 8, 1),
    "b": (["o_proj", "down_proj", "lm_head"], 8, 4, 2),
    "c": (["lm_head"], 2, 16, 3),
    "d": (["k_proj", "up_proj", "gate_proj", "lm_head"], 4, 4, 4),
}
PROMPTS = ["Extract the name: Alice is 30", "Q: 2+2?", "The quick brown fox", "{"]
MESSAGES = [{"role": "user", "content": "Say hello to Bob."}]


def make_adapter(path, targets, r, alpha, seed, base="tiny"):
    model, _ = load_model("tiny", quantize=None, dtype=torch.float32)
    apply_lora(model, targets=targets, r=r, alpha=alpha, dropout=0.0, verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))  # B != 0: the adapter changes the text (docstring)
    save_adapter(model, str(path), base_model_name_or_path=base)
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    return {name: make_adapter(tmp / name, *spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module")
def app(dirs):
    """serve.py's Server in this process on a free port, serving the four adapters."""
    flags = ["--port", "0", "--dtype", "float32", "--quantize", "none", "--max-batch", "16", "--max-queue", "16"]
    for name, path in dirs.items():
        flags += ["--adapter", f"{name}={path}"]
    server = serve_cli.Server(serve_cli.serve_parser().parse_args(flags))
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.close()
    thread.join(5)


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0)  # 429 must not be retried


_REFERENCE = {}


def reference(dirs, name, prompt_ids, n):
    """generate() with adapter `name` alone (loaded as the model's only, default adapter), greedy:
    (token ids, text)."""
    if name not in _REFERENCE:
        model, tok = load_model("tiny", quantize=None, dtype=torch.float32)
        if name != "tiny":
            load_adapter(model, dirs[name])
        _REFERENCE[name] = (model.eval(), tok)
    model, tok = _REFERENCE[name]
    out = generate(model, [prompt_ids], n, eos_ids=tok.eos_ids, pad_id=tok.pad_id)[0]
    return out, tok.decode(out)


def tokenizer():
    return load_model("tiny", quantize=None, dtype=torch.float32)[1]


def post(app, path, body, raw=None):
    """(status, parsed JSON or text) of a POST, errors included."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(app.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def one_sentence_error(body):
    err = body["error"]
    msg = err["message"]
    assert msg.endswith(".") and "\n" not in msg and not re.search(r"\.\s+[A-Z]", msg[:-1]), msg
    assert err["type"] and err["code"], err
    return msg


def test_models_lists_the_base_and_each_adapter_with_its_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", *ADAPTERS}
    assert all(models[n].model_extra["parent"] == "tiny" for n in ADAPTERS)


@pytest.mark.parametrize("name", [*ADAPTERS, "tiny"])
def test_greedy_completion_and_chat_equal_generate_alone(client, dirs, name):
    tok = tokenizer()
    ids = tok.encode(PROMPTS[0], add_special_tokens=True)
    want, text = reference(dirs, name, ids, 12)
    r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert (r.choices[0].text, r.usage.completion_tokens, r.usage.prompt_tokens) == (text, len(want), len(ids))
    chunks = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == text

    chat_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)  # the template adds BOS
    want, text = reference(dirs, name, chat_ids, 10)
    r = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=10, temperature=0)
    assert (r.choices[0].message.content, r.usage.completion_tokens) == (text, len(want))
    chunks = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_the_adapters_write_different_text(client):
    texts = {
        n: client.completions.create(model=n, prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
        for n in [*ADAPTERS, "tiny"]
    }
    assert len(set(texts.values())) == len(texts), texts  # else the equality tests could not tell adapters apart


def hold_scheduler(app):
    """Block the scheduler thread between two steps until the returned event is set."""
    inside, release = threading.Event(), threading.Event()

    def wait():
        inside.set()
        release.wait(60)

    threading.Thread(target=app.scheduler.call, args=(wait,), daemon=True).start()
    assert inside.wait(30)
    return release


def test_sixteen_concurrent_requests_over_four_adapters_each_equal_alone(app, client, dirs, monkeypatch):
    """Sixteen requests over four adapters, joined into one batch, each equal generate() alone; and the
    scheduler looks the adapter list up once per forward, not once per row (each lookup walks the model)."""
    import minilora.serve.scheduler as scheduler

    calls = {"names": 0, "forwards": 0}
    names, forward = scheduler.adapter_names, scheduler.Scheduler._forward

    def counted_names(model):
        calls["names"] += 1
        return names(model)

    def counted_forward(self, *args):
        calls["forwards"] += 1
        return forward(self, *args)

    monkeypatch.setattr(scheduler, "adapter_names", counted_names)
    monkeypatch.setattr(scheduler.Scheduler, "_forward", counted_forward)
    tok = tokenizer()
    jobs = [(name, PROMPTS[i % 4], 4 + 3 * i, i % 3 == 0) for i, name in enumerate(list(ADAPTERS) * 4)]

    def ask(job):
        name, prompt, n, stream = job
        r = client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0, stream=stream)
        return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

    release = hold_scheduler(app)  # all 16 wait in the queue, then join one batch together
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, job) for job in jobs]
        deadline = time.monotonic() + 30
        while app.scheduler.queue.qsize() < 16 and time.monotonic() < deadline:
            time.sleep(0.02)
        release.set()
        got = [f.result(timeout=120) for f in futures]
    assert app.scheduler.most_rows == 16
    for (name, prompt, n, _), text in zip(jobs, got):
        assert text == reference(dirs, name, tok.encode(prompt, add_special_tokens=True), n)[1], (name, prompt, n)
    assert 0 < calls["forwards"] and calls["names"] <= calls["forwards"], calls


def test_requests_joining_a_running_batch_equal_alone(app, client, dirs):
    """A newcomer's cache is spliced beside rows that already hold more tokens (left padding, batch.py)."""
    tok = tokenizer()
    long = client.completions.create(model="b", prompt=PROMPTS[2], max_tokens=40, temperature=0, stream=True)
    pieces = [next(long).choices[0].text]  # b is running now, its cache some tokens long
    release = hold_scheduler(app)
    assert [r.adapter for r in app.scheduler.rows] == ["b"]  # still running while the others join
    jobs = [("a", PROMPTS[0], 5), ("c", PROMPTS[3], 9), ("tiny", PROMPTS[1], 7)]
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(client.completions.create, model=m, prompt=p, max_tokens=n, temperature=0) for m, p, n in jobs
        ]
        deadline = time.monotonic() + 30
        while app.scheduler.queue.qsize() < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        release.set()
        got = [f.result(timeout=60).choices[0].text for f in futures]
    pieces += [c.choices[0].text for c in long]
    assert "".join(pieces) == reference(dirs, "b", tok.encode(PROMPTS[2], add_special_tokens=True), 40)[1]
    for (name, prompt, n), text in zip(jobs, got):
        assert text == reference(dirs, name, tok.encode(prompt, add_special_tokens=True), n)[1], name


def test_refusals_are_their_status_with_one_sentence(app):
    status, body = post(app, "/v1/completions", {"model": "nope", "prompt": "hi", "max_tokens": 2})
    assert status == 404 and "nope" in one_sentence_error(body)
    status, body = post(app, "/v1/completions", None, raw=b'{"model": "a", "prompt": ')
    assert status == 400 and "JSON" in one_sentence_error(body)
    for path, body in [
        ("/v1/completions", {"model": "a", "prompt": ""}),
        ("/v1/chat/completions", {"model": "a", "messages": []}),
    ]:
        status, err = post(app, path, body)
        assert status == 400 and "empty" in one_sentence_error(err)
    status, body = post(app, "/v1/completions", {"model": "a", "prompt": "a " * 5000, "max_tokens": 2})
    assert status == 400 and "context" in one_sentence_error(body)
    status, body = post(app, "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 10**6})
    assert status == 400 and "context" in one_sentence_error(body)


def test_load_and_unload_at_run_time(app, client, dirs, tmp_path):
    tok = tokenizer()
    status, _ = post(app, "/v1/load_lora_adapter", {"lora_name": "c2", "lora_path": dirs["c"]})
    assert status == 200
    ids = tok.encode(PROMPTS[1], add_special_tokens=True)
    r = client.completions.create(model="c2", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert r.choices[0].text == reference(dirs, "c", ids, 6)[1]
    assert "c2" in {m.id for m in client.models.list().data}

    status, body = post(app, "/v1/load_lora_adapter", {"lora_name": "c2", "lora_path": dirs["a"]})
    assert status == 400 and "already loaded" in one_sentence_error(body)
    other = make_adapter(tmp_path / "other", ["lm_head"], 2, 4, 9, base="google/gemma-3-1b-pt")
    status, body = post(app, "/v1/load_lora_adapter", {"lora_name": "other", "lora_path": other})
    assert status == 400 and "gemma-3-1b-pt" in one_sentence_error(body)
    status, body = post(app, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "missing")})
    assert status == 400 and one_sentence_error(body)

    # an unload while c2 runs: hidden at once (404), deleted once its running request has finished
    running = client.completions.create(model="c2", prompt=PROMPTS[1], max_tokens=30, temperature=0, stream=True)
    pieces = [next(running).choices[0].text]
    release = hold_scheduler(app)
    assert [r.adapter for r in app.scheduler.rows] == ["c2"]  # running when the unload arrives
    with ThreadPoolExecutor(1) as pool:
        unload = pool.submit(post, app, "/v1/unload_lora_adapter", {"lora_name": "c2"})
        while app.scheduler.commands.empty():
            time.sleep(0.01)
        release.set()
        deadline = time.monotonic() + 30
        while "c2" in app.scheduler.served() and time.monotonic() < deadline:
            time.sleep(0.01)
        status, body = post(app, "/v1/completions", {"model": "c2", "prompt": "hi", "max_tokens": 2})
        assert status == 404 and one_sentence_error(body)
        pieces += [c.choices[0].text for c in running]
        assert unload.result(timeout=60)[0] == 200
    assert "".join(pieces) == reference(dirs, "c", ids, 30)[1]
    status, body = post(app, "/v1/unload_lora_adapter", {"lora_name": "c2"})
    assert status == 404 and one_sentence_error(body)
    # the indices after an unloaded adapter shift; the others still answer as alone
    r = client.completions.create(model="d", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert r.choices[0].text == reference(dirs, "d", ids, 6)[1]


def test_a_full_queue_answers_429(app):
    release = hold_scheduler(app)
    try:
        with ThreadPoolExecutor(16) as pool:
            waiting = [
                pool.submit(post, app, "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2})
                for _ in range(16)
            ]
            deadline = time.monotonic() + 30
            while app.scheduler.queue.qsize() < 16 and time.monotonic() < deadline:
                time.sleep(0.02)
            status, body = post(app, "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2})
            assert status == 429 and "full" in one_sentence_error(body)
            release.set()
            assert [f.result(timeout=60)[0] for f in waiting] == [200] * 16
    finally:
        release.set()


def read_stream(url, body, out):
    """POST a streaming request and append its raw server-sent events to `out` as they arrive."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            out.append(line.decode())


def test_sigterm_stops_the_server_with_exit_code_0(tmp_path):
    """A request in flight at SIGTERM ends with a last event and [DONE] (finished, or cancelled after
    --shutdown-grace), the socket closes, and the process exits 0."""
    cmd = [sys.executable, os.path.join(ROOT, "serve.py"), "--port", "0", "--dtype", "float32", "--quantize", "none"]
    cmd += ["--shutdown-grace", "1"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "serve.py exited before serving"
        url = re.search(r"http://\S+", line).group(0)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0).choices[0].text
        events: list[str] = []
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2000, "temperature": 0, "stream": True}
        reader = threading.Thread(target=read_stream, args=(url, body, events))
        reader.start()
        deadline = time.monotonic() + 30
        while not any(e.startswith("data: {") for e in events) and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 10
        reader.join(10)
        data = [e for e in events if e.startswith("data: ")]
        assert data[-1] == "data: [DONE]\n" and ("finish_reason" in data[-2] or "shutting_down" in data[-2]), data[-2:]
        with pytest.raises(openai.APIConnectionError):  # the socket is closed
            client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_many_simultaneous_connections_are_accepted_into_the_backlog():
    """While the accepting thread is busy elsewhere (here: not running at all), 32 clients connecting
    at once all complete their TCP handshake: the listen backlog holds them, where socketserver's
    default of 5 leaves the rest to TCP's retries (1 s, 3 s, 7 s, ...)."""
    import socket

    httpd = serve_cli._HTTPServer(("127.0.0.1", 0), serve_cli.Handler)
    socks = []
    try:
        for _ in range(32):
            s = socket.socket()
            s.settimeout(0.5)
            s.connect(httpd.server_address)  # raises socket.timeout when the backlog is full
            socks.append(s)
    finally:
        for s in socks:
            s.close()
        httpd.server_close()
    assert len(socks) == 32


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _libgomp_loaded(), reason="torch runs libgomp's OpenMP here only on Linux builds that use it")
def test_the_loading_thread_releases_its_openmp_workers():
    """Before the scheduler thread takes the model over, the caller's OpenMP workers go (counted as the
    process's OS threads), so that the scheduler's team is the only one computing (release_openmp_threads
    says why that matters); the caller's next parallel op makes them again."""
    from minilora.serve.scheduler import release_openmp_threads

    def os_threads():
        return len(os.listdir(f"/proc/{os.getpid()}/task"))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(256, 256)
        x @ x  # a parallel op: this thread's team, with its worker
        with_team = os_threads()
        release_openmp_threads()
        assert os_threads() < with_team
        x @ x
        assert os_threads() == with_team
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
@pytest.mark.parametrize("budget", [4096, 24])
def test_newcomers_are_prefilled_together_within_the_token_budget(dirs, budget):
    """The scheduler's loop run on this thread: requests of different lengths and adapters that arrive
    together are prefilled in one left-padded forward (with a 24-token budget, in groups whose padded
    size (G P) stays within it, a longer prompt alone), and each generates what generate() gives it alone."""
    from minilora.serve.scheduler import Request, Scheduler

    model, tok = load_model("tiny", quantize=None, dtype=torch.float32)
    sched = Scheduler(model.eval(), tok, max_batch=8, max_prefill_tokens=budget)
    for name in ("a", "b"):
        load_adapter(model, dirs[name], name=name)
        sched.adapters[name] = dirs[name]
    prompts = [tok.encode(p, add_special_tokens=True) for p in PROMPTS]
    jobs = [(prompts[i % 4], [None, "a", "b"][i % 3]) for i in range(6)]
    reqs = [Request(prompt=p, adapter=name, max_tokens=5) for p, name in jobs]
    for r in reqs:
        sched.submit(r)
    groups = []
    prefill = sched._prefill
    sched._prefill = lambda group: groups.append(len(group)) or prefill(group)
    sched._admit()
    assert sum(groups) == 6 and len(sched.rows) == 6
    lengths = [len(p) for p, _ in jobs]
    if budget == 4096:
        assert groups == [6]
    else:  # the same greedy cut: a group grows while (G + 1) max P fits the budget
        want, g, longest = [], 0, 0
        for n in lengths:
            if g and (g + 1) * max(longest, n) > budget:
                want.append(g)
                g, longest = 0, 0
            g, longest = g + 1, max(longest, n)
        want.append(g)
        assert groups == want and len(groups) > 1
    while sched.rows:
        sched._step()
    for (p, name), r in zip(jobs, reqs):
        alone = reference(dirs, name or "tiny", p, 5)[0]
        assert r.tokens == alone, (name, p)


@pytest.mark.parametrize("flag", ["--max-batch", "--max-queue", "--max-new-tokens", "--max-prefill-tokens"])
def test_a_limit_below_one_is_one_sentence(flag, capsys):
    assert serve_cli.main([flag, "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {flag} must be at least 1; fix the flag and run again.", err
