"""Paged optimizer state: page layout, host page store, device page pool (LRU, write-back, prefetch).

Letters: n elements of one parameter, E elements per page, C elements per staging chunk.

The optimizer state of all parameters on one device lives in one flat element space (the page
table): each parameter gets the range [start, start + n) of it, start a multiple of 256, in the
order parameters first get a gradient; the space is cut into fixed-size pages of ``page_bytes``
bytes, E elements each. Small parameters share a page (LoRA matrices are far smaller than a
page), a large one spans several. A page stores both moments side by side, so one page is
everything needed to update its elements:

    state_bits=32:  [ exp_avg f32 (E) | exp_avg_sq f32 (E) ]                 8 bytes / element
    state_bits=8:   [ m codes u8 (E) | v codes u8 (E) | m absmax f32 (E/256) | v absmax f32 (E/256) ]

E and every start are multiples of 256, so the 8-bit blocks are the 256-element blocks of each
flattened parameter (the same blocks bitsandbytes uses).

Where a page lives:
  * host store: a page-sized CPU tensor (pinned when the pool is on CUDA), allocated the first
    time the page must leave the device (or is loaded from a checkpoint); the backing copy.
  * device pool: at most ``capacity = budget // page_bytes`` page-sized buffers ("slots") on the
    parameters' device. A resident page is updated in place; the least recently used unpinned
    page is written back to the host (only if dirty) and its slot reused when a page must come in.
    On a machine without CUDA the pool is a set of separate CPU buffers standing in for device
    memory, so the same page-table code runs (and is tested) everywhere.

``PagePool.waves(items)`` hands the optimizer the pages of one step in waves:
  * everything fits (capacity None, or #pages <= capacity): one wave; pages stay resident across
    steps, so after the first step nothing is copied.
  * capacity >= 2: waves of capacity // 2 pages; while the optimizer updates wave k, wave k + 1 is
    paged in on a side CUDA stream (prefetch). capacity == 1: waves of one page, no prefetch.
  * capacity == 0 (budget below one page, or 0): no page is kept on the device; each page is
    streamed through a staging area of C elements (the largest multiple of 256 whose layout fits
    the budget, at least 256 elements), copied in, updated, copied back. For a budget smaller than
    even 256 elements' state (e.g. 0) that minimal staging area is the one transient exception;
    it is reported as ``staging_bytes``, never as resident.
The optimizer walks its pages in alternating order (forward, then backward) so that with LRU the
pages still resident from the end of one step are the first ones used in the next.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from minilora.quant.blockwise8 import BLOCK, num_blocks


class PageLayout:
    """Byte layout of one page (or staging chunk) of optimizer state."""

    def __init__(self, page_bytes: int, state_bits: int):
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 32 or 8, got {state_bits!r}.")
        self.state_bits = state_bits
        self.bytes_per_block = BLOCK * 8 if state_bits == 32 else BLOCK * 2 + 8  # per 256 elements
        if not isinstance(page_bytes, int) or page_bytes < self.bytes_per_block:
            raise ValueError(
                f"page_bytes={page_bytes!r} is too small: a page must hold at least 256 elements "
                f"({self.bytes_per_block} bytes with state_bits={state_bits}); use at least that."
            )
        self.page_bytes = page_bytes
        self.elems = (page_bytes // self.bytes_per_block) * BLOCK  # E

    def nbytes(self, cap: int) -> int:
        """Bytes of a buffer laid out for cap elements (cap a multiple of 256)."""
        return (cap // BLOCK) * self.bytes_per_block

    def views(self, buf: torch.Tensor, cap: int, n: int) -> dict[str, torch.Tensor]:
        """State views of the first n elements of a uint8 buffer laid out for cap elements."""
        if self.state_bits == 32:
            return {
                "exp_avg": buf[: 4 * cap].view(torch.float32)[:n],  # (n,)
                "exp_avg_sq": buf[4 * cap : 8 * cap].view(torch.float32)[:n],  # (n,)
            }
        nb, nbcap = num_blocks(n), cap // BLOCK
        a0 = 2 * cap  # absmax area starts after the two code arrays (4-byte aligned)
        return {
            "exp_avg_codes": buf[:cap][:n],  # (n,) uint8
            "exp_avg_sq_codes": buf[cap : 2 * cap][:n],  # (n,) uint8
            "exp_avg_absmax": buf[a0 : a0 + 4 * nbcap].view(torch.float32)[:nb],  # (nb,)
            "exp_avg_sq_absmax": buf[a0 + 4 * nbcap : a0 + 8 * nbcap].view(torch.float32)[:nb],
        }


def slice_views(views: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Views of elements [lo, hi) of page views (lo a multiple of 256 so blocks stay aligned)."""
    out = {}
    for key, t in views.items():
        if key.endswith("absmax"):
            out[key] = t[lo // BLOCK : lo // BLOCK + num_blocks(hi - lo)]
        else:
            out[key] = t[lo:hi]
    return out


class Page:
    """One page of state (n = E elements): host copy and/or device slot."""

    __slots__ = ("n", "host", "slot", "dirty", "views")

    def __init__(self, n: int):
        self.n = n
        self.host: torch.Tensor | None = None  # page_bytes uint8 on CPU, None until first needed
        self.slot: torch.Tensor | None = None  # page_bytes uint8 on the device while resident
        self.dirty = False  # device copy newer than the host copy
        self.views: dict[str, torch.Tensor] | None = None  # cached state views into the slot


class Span:
    """Where n elements of a parameter, starting at its flat element lo, live: page, offset."""

    __slots__ = ("page", "off", "lo", "n")

    def __init__(self, page: Page, off: int, lo: int, n: int):
        self.page, self.off, self.lo, self.n = page, off, lo, n


class PageTable:
    """The flat state space of one device, cut into pages of E elements."""

    def __init__(self, layout: PageLayout):
        self.layout = layout
        self.pages: list[Page] = []
        self.end = 0  # first free element

    def alloc(self, n: int) -> list[Span]:
        """Reserve n elements (from a 256 boundary); return the spans, one per page touched."""
        E = self.layout.elems
        start = self.end
        self.end = start + num_blocks(n) * BLOCK
        while len(self.pages) * E < self.end:
            self.pages.append(Page(E))  # zero state; created on first use, no copy
        spans, pos = [], start
        while pos < start + n:
            k, off = divmod(pos, E)
            cnt = min(E - off, start + n - pos)
            spans.append(Span(self.pages[k], off, pos - start, cnt))
            pos += cnt
        return spans


def _host_free_bytes() -> tuple[int, int]:
    """(available, total) physical memory of this machine, for budget="auto" without CUDA."""
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


class PagePool:
    """Device page pool of one device: LRU over resident pages, write-back, prefetch."""

    def __init__(self, layout: PageLayout, device: torch.device, budget: int | str | None):
        self.layout = layout
        self.device = device
        self.budget = budget
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.lru: OrderedDict[Page, None] = OrderedDict()  # resident pages, least recent first
        self.capacity: int | None = None  # pages; None = unlimited
        self.budget_bytes: int | None = None
        self.stats = dict(
            bytes_copied_in=0,
            bytes_copied_out=0,
            evictions=0,
            resident_bytes=0,
            peak_resident_bytes=0,
            staging_bytes=0,
        )
        self.free_bytes_fn = self._free_device_bytes  # replaceable (tests simulate memory spikes)
        self.refresh()

    # ---- budget ---------------------------------------------------------------------------------
    def _free_device_bytes(self) -> tuple[int, int]:
        """(free, total) bytes the pool could use: device free memory plus the caching
        allocator's reserved-but-unused bytes (PyTorch can hand those to us too)."""
        if not self.cuda:
            return _host_free_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return free + cached, total

    def refresh(self) -> None:
        """Recompute the capacity (re-reading free memory for "auto") and shrink if needed."""
        if self.budget is None:
            self.budget_bytes, self.capacity = None, None
            return
        if self.budget == "auto":
            free, total = self.free_bytes_fn()
            headroom = max(512 << 20, total // 10)  # left for activations of the next batch
            budget = max(0, self.stats["resident_bytes"] + free - headroom)
        else:
            budget = int(self.budget)
        self.budget_bytes = budget
        self.capacity = budget // self.layout.page_bytes
        if len(self.lru) > self.capacity:
            self._sync()
            while len(self.lru) > self.capacity:
                self._evict(pinned=set())  # slot dropped: the memory goes back to the device
                self.stats["resident_bytes"] -= self.layout.page_bytes
            self._sync()

    # ---- residency ------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
            self.copy_stream.synchronize()

    def _new_host_page(self) -> torch.Tensor:
        return torch.zeros(self.layout.page_bytes, dtype=torch.uint8, pin_memory=self.cuda)

    def _evict(self, pinned: set) -> torch.Tensor:
        """Write back (if dirty) and evict the least recently used unpinned page; return its slot."""
        victim = next(p for p in self.lru if p not in pinned)
        del self.lru[victim]
        if victim.dirty:
            if victim.host is None:
                victim.host = self._new_host_page()
            victim.host.copy_(victim.slot, non_blocking=self.cuda)
            self.stats["bytes_copied_out"] += self.layout.page_bytes
        slot = victim.slot
        victim.slot, victim.views, victim.dirty = None, None, False
        self.stats["evictions"] += 1
        return slot  # still counted as resident: the caller reuses or frees it

    def make_resident(self, page: Page, pinned: set) -> None:
        """Bring page into a slot (evicting the LRU unpinned page when full) and mark it used."""
        if page.slot is not None:
            self.lru.move_to_end(page)
            return
        if self.capacity is not None and len(self.lru) >= self.capacity:
            slot = self._evict(pinned)
        else:
            slot = torch.empty(self.layout.page_bytes, dtype=torch.uint8, device=self.device)
            self.stats["resident_bytes"] += self.layout.page_bytes
            self.stats["peak_resident_bytes"] = max(self.stats["peak_resident_bytes"], self.stats["resident_bytes"])
        if page.host is None:  # a new page: zero state, created on the device, no copy
            slot.zero_()
            page.dirty = True
        else:
            slot.copy_(page.host, non_blocking=self.cuda)
            self.stats["bytes_copied_in"] += self.layout.page_bytes
        page.slot = slot
        page.views = self.layout.views(slot, self.layout.elems, page.n)
        self.lru[page] = None

    def _load(self, pages: list[Page], pinned: set) -> None:
        """Make pages resident; on CUDA on the side stream, after the compute already queued
        (a victim's last update must finish before it is written back)."""
        if not self.cuda:
            for p in pages:
                self.make_resident(p, pinned)
            return
        main = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(main)
        with torch.cuda.stream(self.copy_stream):
            for p in pages:
                self.make_resident(p, pinned)

    # ---- the optimizer's view -------------------------------------------------------------------
    def waves(self, items: list):
        """Yield lists of (item, lo, hi, views): state views of elements [lo, hi) of a span.

        Each item is a Span (``.page``, ``.off``, ``.n``). After the consumer returns from a
        yield, it has updated those views in place; the pages are then marked dirty (resident)
        or copied back (streamed).
        """
        self.refresh()
        if self.capacity == 0:
            yield from self._stream(items)
            return
        by_page: dict[Page, list] = {}  # distinct pages in first-use order, with their spans
        for it in items:
            by_page.setdefault(it.page, []).append(it)
        pages = list(by_page)
        if self.capacity is None or len(pages) <= self.capacity:
            size, prefetch = max(1, len(pages)), False
        else:
            size, prefetch = max(1, self.capacity // 2), self.capacity >= 2
        waves = [pages[i : i + size] for i in range(0, len(pages), size)]
        for k, wave in enumerate(waves):
            pinned = set(wave)
            self._load(wave, pinned)  # no-op for pages prefetched at k - 1
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            if prefetch and k + 1 < len(waves):
                self._load(waves[k + 1], pinned | set(waves[k + 1]))  # overlaps the update on CUDA
            yield [(it, 0, it.n, slice_views(pg.views, it.off, it.off + it.n)) for pg in wave for it in by_page[pg]]
            for pg in wave:
                pg.dirty = True

    def _stream(self, items: list):
        """capacity 0: stream each page through a staging chunk of C elements (see module doc)."""
        lay = self.layout
        cap = max(BLOCK, min(lay.elems, (self.budget_bytes // lay.bytes_per_block) * BLOCK))
        staging = torch.empty(lay.nbytes(cap), dtype=torch.uint8, device=self.device)
        self.stats["staging_bytes"] = max(self.stats["staging_bytes"], lay.nbytes(cap))
        for it in items:
            page = it.page
            if page.host is None:
                page.host = self._new_host_page()
            host = lay.views(page.host, lay.elems, page.n)
            for lo in range(0, it.n, cap):
                hi = min(it.n, lo + cap)
                hv = slice_views(host, it.off + lo, it.off + hi)
                sv = lay.views(staging, cap, hi - lo)
                for key in hv:
                    sv[key].copy_(hv[key])
                    self.stats["bytes_copied_in"] += hv[key].numel() * hv[key].element_size()
                yield [(it, lo, hi, sv)]
                for key in hv:
                    hv[key].copy_(sv[key])  # synchronous: the host page is current on return
                    self.stats["bytes_copied_out"] += hv[key].numel() * hv[key].element_size()

    # ---- checkpoint access ----------------------------------------------------------------------
    def read(self, page: Page) -> dict[str, torch.Tensor]:
        """Current state views of a page (device views if resident, else the host copy)."""
        if page.slot is not None:
            return page.views
        self._sync()  # pending write-backs into the host page must land first
        if page.host is None:
            page.host = self._new_host_page()
        return self.layout.views(page.host, self.layout.elems, page.n)

    def write(self, span: Span, src: dict[str, torch.Tensor]) -> None:
        """Overwrite a span's state (from a checkpoint): in the page's slot if resident or the
        pool is unlimited, else in the host copy."""
        page = span.page
        if page.slot is None and self.capacity is None:
            self.make_resident(page, pinned={page})
        dst = slice_views(self.read(page), span.off, span.off + span.n)
        for key, t in dst.items():
            t.copy_(src[key])
        if page.slot is not None:
            page.dirty = True

    def drop(self, page: Page) -> None:
        """Forget a page (its parameter's state is being replaced): free its slot, no write-back."""
        if page.slot is not None:
            self._sync()
            del self.lru[page]
            self.stats["resident_bytes"] -= self.layout.page_bytes
        page.slot, page.views, page.host, page.dirty = None, None, None, False
