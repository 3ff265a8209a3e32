"""Continuous batching across adapters: one thread owns the model and decodes one token for every
running request per step; new requests join at step boundaries (Orca's iteration-level scheduling,
without its paged memory).

Shape letters: B running rows, P a prompt's tokens, S cache columns, D hidden size, V vocab, L layers.

The loop, on the scheduler thread (the only thread that touches the model):

    run queued commands (load / unload an adapter, anything else that changes the model)
    admit: while B < max_batch and requests wait: prefill the newcomers together -> their first tokens
    splice the running rows and the newcomers into one right-aligned cache (batch.py)
    step:  logits (B, V) = model(newest token of each row (B, 1), cache, adapter_ids (B,))
           each row picks its token (argmax, or its own temperature / top_p / seed), checks EOS,
           stop strings and max_tokens, and hands its new text to the HTTP thread waiting on it
    drop the finished and cancelled rows (another splice)

What it costs, against each request decoded alone (n_b the tokens of row b, S = max_b n_b):
  - a decode step runs the linear layers once on B tokens instead of B times on one: the weights are
    read once per step, which is the whole point (decoding is bound by reading weights);
  - attention reads B S cached positions instead of sum_b n_b: the left padding of short rows beside
    long ones (paged attention, vLLM's answer, gathers only the real blocks);
  - the newcomers of a step are prefilled together, left-padded to the longest prompt as generate()
    pads (up to max_prefill_tokens padded tokens a forward, which bounds its activations), while the
    running rows wait one prefill long; then a splice copies 2 L S Hkv hd numbers per row. Re-prefilling
    every running row at each join (the simpler alternative) would instead recompute sum_b n_b tokens
    through every layer; prefilling each newcomer alone would run the linear layers once per request;
  - every LoRA term takes the mixed-batch path of minilora/lora/multi.py (mixed_delta): rows of
    different adapters share its matmuls, and a batch on one adapter is served as that adapter alone.
Each row computes what it would alone (batch.py says why), so greedy output equals generate() on that
request alone, up to the summation order of the batched matmuls.

Adapters change only between steps, on this thread, so no step sees a half-loaded adapter or an index
that moved. Rows name their adapter, and adapter_ids are looked up again at each step (an unload shifts
the indices after it). An unload hides the adapter at once (new requests get 404) and deletes it when no
running row uses it any more.

A DoRA adapter cannot be applied per row (its magnitude rescales whole rows of W0), so serve.py loads it
as the model's own adapter and names it `solo`: its rows run in batches of their own, through the model
without adapter_ids, as generate() runs it alone. A request that cannot join the running batch (a solo
row beside others, or the reverse) is held, and so is everything queued after it, until that batch drains.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from minilora.lora import adapter_names, delete_adapter, load_adapter
from minilora.lora.layers import AdapterError
from minilora.models.generate import KVCache, left_padded, pick_token
from minilora.models.transformer import adapters_per_row
from minilora.serve.batch import splice


class ServeError(Exception):
    """A request the server refuses: an HTTP status, one sentence, and OpenAI's error code."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` may still change or start a stop string: an incomplete
    UTF-8 character (the tokenizer shows it as U+FFFD) or the longest proper prefix of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


@dataclass(eq=False)
class Request:
    """One completion: its prompt ids, adapter (None: the base) and sampling settings; `events` is what the
    HTTP thread reads: ("text", delta), then ("done", finish_reason, completion_tokens) or
    ("error", ServeError)."""

    prompt: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False  # the client went away: dropped at the next step
    tokens: list[int] = field(default_factory=list)  # generated so far, EOS included
    sent: str = ""  # text already handed out (the streamed chunks concatenate to it)
    gen: torch.Generator | None = None

    def fail(self, err: ServeError) -> None:
        self.events.put(("error", err))

    def add_token(self, token: int, tokenizer, eos_ids: set[int]) -> bool:
        """Record one generated token, hand out the text that can no longer change; True when finished."""
        self.tokens.append(token)
        if token in eos_ids:
            return self._finish("stop")
        text = tokenizer.decode(self.tokens)  # the whole completion again: exact at merges, O(n) per token
        hits = [i for i in (text.find(s, max(0, len(self.sent) - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self._emit(text[: min(hits)])
            return self._finish("stop")
        if len(self.tokens) >= self.max_tokens:
            self._emit(text)
            return self._finish("length")
        self._emit(text[: len(text) - _held_back(text, self.stop)])
        return False

    def _emit(self, text: str) -> None:
        # a decode that rewrote what was already sent cannot be taken back; the rest waits for the next token
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.events.put(("text", text[len(self.sent) :]))
            self.sent = text

    def _finish(self, reason: str) -> bool:
        self.events.put(("done", reason, len(self.tokens)))
        return True


def release_openmp_threads() -> None:
    """Free the calling thread's OpenMP workers (libgomp's omp_pause_resource_all) before another thread
    takes the model over. libgomp counts the workers of every thread's team, and with more of them than
    CPUs it spins less before sleeping, in every team: each parallel op then waits for its workers to
    wake (bench/README.md measured what that costs a decoding step). The caller's team is made again when
    it next computes. A no-op where torch runs another OpenMP."""
    try:
        ctypes.CDLL("libgomp.so.1").omp_pause_resource_all(1)  # 1: omp_pause_soft
    except (OSError, AttributeError):
        pass


class Scheduler:
    """The model's only user once started: a bounded queue of Requests in, a thread running the loop of
    the module docstring. `call(fn)` runs fn on that thread between two steps (adapter changes)."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, max_prefill_tokens: int = 4096):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens  # padded tokens in one prefill forward (its activations)
        self.eos = set(tokenizer.eos_ids)
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.commands: queue.Queue[tuple] = queue.Queue()
        self.wake = threading.Event()
        self.lock = threading.Lock()  # guards `adapters`, which HTTP threads read
        self.adapters: dict[str, str] = {}  # name -> folder: what is served now
        self.solo: str | None = None  # the served name of the model's own (DoRA) adapter: batches of its own
        self.held: Request | None = None  # taken from the queue, waiting for the running batch to drain
        self.unloading: dict[str, list[Future]] = {}  # hidden, deleted once no running row uses them
        self.rows: list[Request] = []  # row b of self.cache
        self.cache: KVCache | None = None
        self.stop_at: float | None = None  # monotonic deadline for running rows once stop() is called
        self.most_rows = 0  # the largest batch a step ran (tests check that batching happened)
        self.thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    # ------------------------------------------------------------------ called from HTTP threads
    def start(self) -> None:
        release_openmp_threads()  # the caller (which loaded the model) is done with it
        self.thread.start()

    def served(self) -> dict[str, str]:
        with self.lock:
            return dict(self.adapters)

    def submit(self, req: Request) -> None:
        """Queue a request; ServeError 404 for an adapter not served, 429 when the queue is full, 503 when
        stopping."""
        if self.stop_at is not None:
            raise ServeError(503, "The server is shutting down and takes no new requests.", "shutting_down")
        with self.lock:
            if req.adapter is not None and req.adapter not in self.adapters:
                raise ServeError(
                    404, f"The model {req.adapter!r} does not exist; GET /v1/models lists them.", "model_not_found"
                )
        if req.temperature > 0 and req.seed is not None:
            req.gen = torch.Generator(device=self.device).manual_seed(req.seed)
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise ServeError(
                429, f"The request queue is full ({self.queue.maxsize} waiting); retry in a moment.", "queue_full"
            ) from None
        self.wake.set()

    def call(self, fn, timeout: float | None = None):
        """fn() on the scheduler thread between two steps; its result, or its exception raised here."""
        fut: Future = Future()
        self.commands.put((fn, fut))
        self.wake.set()
        return fut.result(timeout)

    def load(self, name: str, folder: str) -> None:
        """Serve the PEFT adapter in `folder` as `name` (checked against the base by the caller)."""

        def run():
            if name in self.adapters or name in self.unloading:
                raise AdapterError(
                    f"An adapter named {name!r} is already loaded; unload it first or pick another name."
                )
            load_adapter(self.model, folder, name=name)
            with self.lock:
                self.adapters[name] = folder

        self.call(run)

    def unload(self, name: str, timeout: float | None = None) -> None:
        """Stop serving `name` now; returns once the running requests that use it have finished."""
        fut: Future = Future()

        def run():
            with self.lock:
                if name not in self.adapters:
                    raise ServeError(
                        404, f"No adapter named {name!r} is loaded; GET /v1/models lists them.", "model_not_found"
                    )
                del self.adapters[name]
            self.unloading.setdefault(name, []).append(fut)
            self._finish_unloads()

        self.call(run)
        fut.result(timeout)

    def stop(self, grace: float) -> None:
        """Refuse what waits (503), let the running rows finish for up to `grace` seconds, cancel the rest
        (503), and end the thread."""
        deadline = time.monotonic() + grace
        self.stop_at = deadline if self.stop_at is None else min(self.stop_at, deadline)  # a signal may have set it
        self.wake.set()
        self.thread.join()

    # ------------------------------------------------------------------ the scheduler thread
    def _run(self) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                while True:
                    self._run_commands()
                    if self.stop_at is not None:
                        self._refuse_queued()
                        if not self.rows or time.monotonic() > self.stop_at:
                            break
                    else:
                        self._admit()
                    if self.rows:
                        self._step()
                    else:
                        release_openmp_threads()  # idle: its workers would slow whichever thread computes next
                        self.wake.wait(0.5)
                        self.wake.clear()
        except Exception as e:  # a bug or an out-of-memory: every waiting client gets an answer
            self.stop_at = 0.0
            err = ServeError(500, f"The scheduler stopped ({type(e).__name__}: {e}); restart the server.", "internal")
            for r in self.rows:
                r.fail(err)
            self.rows = []
            self._refuse_queued(err)
            raise
        gone = ServeError(503, "The server shut down before this request finished.", "shutting_down")
        for r in self.rows:
            r.fail(gone)
        self.rows, self.cache = [], None
        self._run_commands()  # commands that raced the stop get their answer
        for futs in self.unloading.values():
            for f in futs:
                f.set_result(None)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)

    def _refuse_queued(self, err: ServeError | None = None) -> None:
        err = err or ServeError(503, "The server is shutting down and takes no new requests.", "shutting_down")
        if self.held is not None:
            self.held.fail(err)
            self.held = None
        while True:
            try:
                self.queue.get_nowait().fail(err)
            except queue.Empty:
                return

    def _forward(self, ids: torch.Tensor, cache: KVCache, rows: list[Request], mask=None) -> torch.Tensor:
        """Logits of the last position (B, V) for ids (B, T) appended to `cache` (mask (B, T): 1 real, 0 left
        padding; all real by default), each row through its adapter; the calls generate() makes, so that a
        row computes what generate() computes for it."""
        B, T = ids.shape
        if self._is_solo(rows[0]):  # a solo batch (_admit): the model's own adapter on every row, as generate() alone
            adapter_ids = None
        else:
            names = adapter_names(self.model)  # once per step: it walks the model's modules
            adapter_ids = [-1 if r.adapter is None else names.index(r.adapter) for r in rows]
        mask = torch.ones(B, T, dtype=torch.long, device=self.device) if mask is None else mask
        with adapters_per_row(adapter_ids, B, self.device):  # lm_head may carry adapters too
            h = self.model(ids, attention_mask=mask, cache=cache, return_hidden=True)[:, -1]  # (B, D)
            return self.model.logits_from_hidden(h)  # (B, V)

    def _pick(self, logits: torch.Tensor, rows: list[Request]) -> list[int]:
        """Each row's next token from logits (B, V): argmax, or a sample with the row's own settings."""
        out = logits.argmax(dim=-1).tolist()  # (B,)
        for b, r in enumerate(rows):
            if r.temperature > 0:
                out[b] = int(pick_token(logits[b : b + 1], r.temperature, r.top_p, r.gen))
        return out

    def _admit(self) -> None:
        """Prefill waiting requests while the batch has room, then splice them in. Newcomers are prefilled
        together, left-padded as generate() pads a batch, in groups of at most max_prefill_tokens padded
        tokens (a longer prompt alone)."""
        waiting: list[Request] = []
        while len(self.rows) + len(waiting) < self.max_batch:
            req = self._next_request()
            if req is None:
                break
            if req.cancelled:
                continue
            if req.adapter is not None and req.adapter not in self.adapters:  # unloaded while it waited
                req.fail(
                    ServeError(
                        404, f"The model {req.adapter!r} was unloaded before this request ran.", "model_not_found"
                    )
                )
                continue
            batch = self.rows or waiting
            if batch and self._is_solo(batch[0]) != self._is_solo(req):  # cannot share a forward (docstring)
                self.held = req  # first come, first served: it starts when the running batch has drained
                break
            waiting.append(req)
        joined: list[tuple[Request, KVCache, int]] = []
        group: list[Request] = []
        for req in waiting:
            padded = (len(group) + 1) * max(len(r.prompt) for r in [*group, req])  # (G + 1) P
            if group and padded > self.max_prefill_tokens:
                joined += self._prefill(group)
                group = []
            group.append(req)
        if group:
            joined += self._prefill(group)
        if joined:
            self._rebuild(list(range(len(self.rows))), joined)

    def _next_request(self) -> Request | None:
        req, self.held = self.held, None
        if req is not None:
            return req
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            return None

    def _is_solo(self, req: Request) -> bool:
        return req.adapter is not None and req.adapter == self.solo

    def _prefill(self, group: list[Request]) -> list[tuple[Request, KVCache, int]]:
        """One forward of the group's prompts, left-padded to the longest P into one cache (G rows, P
        columns: each row's keys right-aligned, as batch.py wants them); each request gets its first
        token. Returns (request, the cache, its row) of those not finished by it."""
        ids, mask = left_padded([r.prompt for r in group], 0, self.device)  # (G, P); 0 under the mask: any id
        cache = KVCache(self.model.config, *ids.shape, self.dtype, self.device)  # (G, Hkv, P, hd) per layer
        first = self._pick(self._forward(ids, cache, group, mask), group)
        return [(r, cache, b) for b, r in enumerate(group) if not r.add_token(first[b], self.tokenizer, self.eos)]

    def _rebuild(self, keep: list[int], joined: list[tuple[Request, KVCache, int]] = ()) -> None:
        """The batch becomes rows `keep` of the current one, then each joined (request, its cache, its row)."""
        parts = [(self.cache, b) for b in keep] + [(c, b) for _, c, b in joined]
        self.rows = [self.rows[b] for b in keep] + [r for r, _, _ in joined]
        self.cache = splice(self.model.config, parts, self.dtype, self.device) if parts else None

    def _step(self) -> None:
        """One token for every running row."""
        if self.cache.length == self.cache.max_len:  # no free column: copy into a cache with headroom again
            self._rebuild(list(range(len(self.rows))))
        B = len(self.rows)
        self.most_rows = max(self.most_rows, B)
        newest = torch.tensor([[r.tokens[-1]] for r in self.rows], dtype=torch.long, device=self.device)  # (B, 1)
        picked = self._pick(self._forward(newest, self.cache, self.rows), self.rows)
        keep = [
            b
            for b, (r, t) in enumerate(zip(self.rows, picked))
            if not r.add_token(t, self.tokenizer, self.eos) and not r.cancelled
        ]
        if len(keep) < B:
            self._rebuild(keep)
            self._finish_unloads()

    def _finish_unloads(self) -> None:
        """Delete the hidden adapters no running row uses any more, and answer their unload calls."""
        busy = {r.adapter for r in self.rows}
        for name in [n for n in self.unloading if n not in busy]:
            if name == self.solo:  # the model's own adapter is not deleted; no row names it any more
                self.solo = None
            else:
                delete_adapter(self.model, name)
            for fut in self.unloading.pop(name):
                fut.set_result(None)
