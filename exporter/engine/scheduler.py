"""The engine's queue and batch loop, on one worker thread so torch never blocks the event loop.

Requests wait in a bounded FIFO queue. The worker runs **iteration-level (continuous)
batching**: before every decode step it admits waiting requests, up to ``max_batch`` rows in
all, prefills them together (one left-padded forward), samples their first tokens and merges
their KV caches into the running batch (:mod:`exporter.engine.kvbatch`); then one batched decode
step gives every row its next token. Rows that finish (stop token, stop string, length, client
gone) leave the cache at once. A request arriving mid-batch so waits one step, not a whole batch.

Merging is exact, not approximate: pads sit only left of each row's first real token and each
row keeps its own position ids, so a row sees what it would see alone (greedy tokens equal solo
``generate()`` for float32 models, full and sliding-window attention alike; pinned in
``tests/test_engine_batching.py``). bf16 rows in a batch can still differ slightly from solo
runs, as with any padded batch. Models whose cache layers are not plain dynamic or
sliding-window layers (see :func:`~exporter.engine.kvbatch.unmergeable`) fall back, with a log
line at start, to batch-at-a-time: requests arriving while a batch runs wait for the next one.
transformers' own continuous batching was measured first and rejected for CPU (see the engine
README section / the issue notes).

Phase definitions (``perf_counter`` on the worker thread; all per request):

- ``queue``    = submit → admitted to a prefill group (time spent waiting in the engine queue).
- ``prompt``   = admission → first token sampled (its group's prefill forward plus sampling;
  shared by the group's requests, as prefill really is).
- ``predicted``= first token sampled → last token sampled (the decode steps; they include the
  prefills of requests that join meanwhile, which stall the batch for one forward).
- ``predicted_n`` counts every generated token, the first one and a final stop token included,
  and equals ``usage.completion_tokens``; ``predicted_per_token_ms`` = predicted_ms /
  predicted_n, as llama.cpp computes it.
- ``batch_size`` = the most rows the request was computed with (its prefill group or a decode
  step). ``/engine/stats``: ``batches`` counts prefill groups, ``max_batch_seen`` the largest
  row count, ``running`` the rows now in the batch (or being prefilled).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The engine queue holds ``max_queue`` requests already."""


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says


@dataclass
class Timings:
    queue_ms: float
    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    batch_size: int

    def as_dict(self) -> dict[str, Any]:
        """llama.cpp's ``timings`` object plus ``queue_ms`` and ``batch_size``. ``cache_n`` is 0:
        this engine reuses no prefix, every prompt token is evaluated (so a reader knows the
        prompt length is ``prompt_n``, as llama-server's ``prompt_n + cache_n``)."""
        pn, pms, gn, gms = self.prompt_n, self.prompt_ms, self.predicted_n, self.predicted_ms
        return {
            "queue_ms": round(self.queue_ms, 3),
            "cache_n": 0, "prompt_n": pn, "prompt_ms": round(pms, 3),
            "prompt_per_token_ms": round(pms / pn, 3) if pn else 0.0,
            "prompt_per_second": round(pn * 1000 / pms, 3) if pms > 0 else 0.0,
            "predicted_n": gn, "predicted_ms": round(gms, 3),
            "predicted_per_token_ms": round(gms / gn, 3) if gn else 0.0,
            "predicted_per_second": round(gn * 1000 / gms, 3) if gms > 0 else 0.0,
            "batch_size": self.batch_size,
        }


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length" | "cancelled"
    text: str
    timings: Timings


class Handle:
    """One request's link between the worker thread and its asyncio consumer.

    ``events`` yields ``str`` text deltas, then one :class:`Finished` (or an ``Exception``).
    """

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop, rid: int) -> None:
        self.req, self.loop, self.id = req, loop, rid
        self.events: asyncio.Queue[str | Finished | Exception] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.t_submit = time.perf_counter()

    def put(self, item: str | Finished | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the consumer's loop is gone: nobody to tell
            self.cancelled.set()


@dataclass
class _Row:
    handle: Handle
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of decoded text already sent
    text: str = ""
    done: str = ""
    t_admit: float = 0.0
    batch_max: int = 1  # most rows it was computed with
    t_first: float = 0.0
    t_last: float = 0.0


class Scheduler:
    def __init__(self, model: Any, tokenizer: Any, stop_ids: frozenset[int], device: str,
                 max_batch: int = 8, max_queue: int = 64) -> None:
        self.model, self.tok, self.stop_ids, self.device = model, tokenizer, stop_ids, device
        self.max_batch, self.max_queue = max(1, max_batch), max_queue
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self.running = 0
        self.busy_seconds = 0.0
        self.batches = 0
        self.max_batch_seen = 0
        self.completed = 0
        self.continuous = True  # settled by _warm_up from the model's cache layers
        self._cache_kw = "past_key_values"  # settled by _warm_up: the forward's KV-cache argument
        self._rows: list[_Row] = []  # worker thread only: the running batch's rows, in order
        self._batch: Any = None  # worker thread only: their KVBatch
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # --- the asyncio side ---
    def start(self) -> None:
        self._warm_up()
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def submit(self, req: GenRequest) -> Handle:
        h = Handle(req, asyncio.get_running_loop(), next(self._ids))
        with self._cond:
            if self.max_queue and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"engine queue is full ({self.max_queue} waiting)")
            self._waiting.append(h)
            self._cond.notify()
        return h

    def cancel(self, h: Handle) -> None:
        """Client gone: drop it from the queue, or from its batch at the next step."""
        h.cancelled.set()
        with self._cond:
            if h in self._waiting:
                self._waiting.remove(h)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            waiting = len(self._waiting)
        return {"busy_seconds": round(self.busy_seconds, 6), "waiting": waiting,
                "running": self.running, "batches": self.batches,
                "max_batch_seen": self.max_batch_seen, "completed": self.completed,
                "max_batch": self.max_batch, "max_queue": self.max_queue}

    # --- the worker thread ---
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._rows and not self._stopping:
                    self._cond.wait()
                if self._stopping:  # finish the running rows, admit nobody
                    for h in self._waiting:
                        h.put(RuntimeError("engine shutting down"))
                    self._waiting.clear()
                    if not self._rows:
                        return
                room = self.max_batch - len(self._rows)
                if self._rows and not self.continuous:
                    room = 0
                group = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                self.running = len(self._rows) + len(group)
            t0 = time.perf_counter()
            try:
                if group:
                    self._admit(group, t0)
                if self._rows:
                    self._decode()
            finally:
                self.busy_seconds += time.perf_counter() - t0
                self.running = len(self._rows)

    def _warm_up(self) -> None:
        """One forward before serving; its cache tells whether rows can join a running batch."""
        import sys

        import torch
        from transformers import DynamicCache

        from exporter.engine.kvbatch import cache_argument, unmergeable

        self._cache_kw = cache_argument(self.model)
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            ids = torch.tensor([[self.tok.pad_token_id or 0] * 4], device=self.device)
            self.model(input_ids=ids, use_cache=True, **{self._cache_kw: cache})
        why = unmergeable(cache)
        self.continuous = why is None
        mode = ("continuous batching (requests join the running batch between decode steps)"
                if why is None else f"static batching: {why} cannot be merged, so requests "
                "arriving while a batch runs wait for the next batch")
        print(f"llm-exporter engine: {mode}", file=sys.stderr, flush=True)

    def _admit(self, group: list[Handle], t_admit: float) -> None:
        """Prefill ``group`` as one left-padded batch, sample its first tokens, merge the rest."""
        import torch
        from transformers import DynamicCache

        from exporter.engine.kvbatch import KVBatch

        rows = [_Row(h, t_admit=t_admit, batch_max=len(group)) for h in group]
        self.batches += 1
        self.max_batch_seen = max(self.max_batch_seen, len(self._rows) + len(group))
        try:
            width = max(len(h.req.prompt_ids) for h in group)
            pad = self.tok.pad_token_id or 0
            input_ids = torch.tensor([[pad] * (width - len(h.req.prompt_ids)) + h.req.prompt_ids
                                      for h in group], device=self.device)
            mask = torch.tensor([[0] * (width - len(h.req.prompt_ids))
                                 + [1] * len(h.req.prompt_ids) for h in group],
                                device=self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache(config=self.model.config)
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                                    use_cache=True, logits_to_keep=1,
                                    **{self._cache_kw: cache}).logits[:, -1, :]
            keep = self._emit(rows, logits)
        except Exception as e:  # a failed prefill fails its group, not the running batch
            for h in group:
                h.put(e)
            return
        if not keep:
            return
        try:
            fresh = KVBatch(cache, mask)
            if len(keep) < len(rows):
                fresh.select(keep)
            if self._batch is None:
                self._batch = fresh
            else:
                self._batch.merge(fresh)
        except Exception as e:
            self._fail_all(e)
            for i in keep:
                rows[i].handle.put(e)
            return
        self._rows += [rows[i] for i in keep]

    def _decode(self) -> None:
        """One batched decode step: every row gets its next token; finished rows leave."""
        import torch

        batch = self._batch
        assert batch is not None
        try:
            n = len(self._rows)
            for row in self._rows:
                row.batch_max = max(row.batch_max, n)
            mask, pos = batch.step_inputs()
            step = torch.tensor([[row.ids[-1]] for row in self._rows], device=self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=step, attention_mask=mask, position_ids=pos,
                                    use_cache=True,
                                    **{self._cache_kw: batch.cache}).logits[:, -1, :]
            keep = self._emit(self._rows, logits)
            if not keep:
                self._rows, self._batch = [], None
            elif len(keep) < n:
                batch.select(keep)
                self._rows = [self._rows[i] for i in keep]
        except Exception as e:  # a failed step fails the batch's requests, not the engine
            self._fail_all(e)

    def _fail_all(self, e: Exception) -> None:
        for row in self._rows:
            row.handle.put(e)
        self._rows, self._batch = [], None

    def _emit(self, rows: list[_Row], logits: Any) -> list[int]:
        """Sample a token per row, stream it, finish done rows; the indices of rows going on."""
        tokens = self._sample(logits, [row.handle.req for row in rows])
        now = time.perf_counter()
        keep = []
        for b, row in enumerate(rows):
            if not row.ids:
                row.t_first = now
            row.t_last = now
            row.ids.append(tokens[b])
            self._advance(row)
            if row.done:
                self.running -= 1  # before the reply leaves, so /engine/stats agrees with it
                self._finish(row)
            else:
                keep.append(b)
        return keep

    def _sample(self, logits: Any, reqs: list[GenRequest]) -> list[int]:
        import torch

        out = logits.float().argmax(-1).tolist()
        for b, r in enumerate(reqs):
            if r.temperature > 0:
                probs = torch.softmax(logits[b].float() / r.temperature, -1)
                if r.top_p < 1.0:
                    sp, si = probs.sort(descending=True)
                    cut = sp.cumsum(-1) - sp > r.top_p
                    sp[cut] = 0.0
                    probs = torch.zeros_like(probs).scatter_(0, si, sp)
                out[b] = int(torch.multinomial(probs, 1))
        return out

    def _advance(self, row: _Row) -> None:
        """Decode the new token, stream the text that is certain, and decide if the row ends."""
        req, h = row.handle.req, row.handle
        hit_stop_id = row.ids[-1] in self.stop_ids and not req.ignore_eos
        text_ids = row.ids[:-1] if hit_stop_id else row.ids
        text = self.tok.decode(text_ids, skip_special_tokens=True)
        cut = len(text)
        for s in req.stop:
            at = text.find(s, max(0, len(row.text) - len(s)))
            if s and at >= 0:
                cut, row.done = min(cut, at), "stop"
        text = text[:cut]
        row.text = text
        if h.cancelled.is_set():
            row.done = "cancelled"
        elif hit_stop_id:
            row.done = "stop"
        elif len(row.ids) >= req.max_tokens and not row.done:
            row.done = "length"
        if row.done:
            safe = len(text)
        else:  # hold back a partial UTF-8 character and a possible stop-string prefix
            hold = max((len(s) - 1 for s in req.stop), default=0)
            safe = len(text) - hold
            while safe > row.emitted and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > row.emitted:
            h.put(text[row.emitted:safe])
            row.emitted = safe

    def _finish(self, row: _Row) -> None:
        h = row.handle
        t = Timings(queue_ms=(row.t_admit - h.t_submit) * 1000, prompt_n=len(h.req.prompt_ids),
                    prompt_ms=(row.t_first - row.t_admit) * 1000, predicted_n=len(row.ids),
                    predicted_ms=(row.t_last - row.t_first) * 1000, batch_size=row.batch_max)
        self.completed += 1
        h.put(Finished(row.done, row.text, t))
