"""The engine's queue and batch loop, on one worker thread so torch never blocks the event loop.

Requests wait in a bounded FIFO queue. Whenever the model is idle the worker admits up to
``max_batch`` of them as one batch: one left-padded prefill forward for all of them, then one
batched decode step per token; rows that finish (stop token, stop string, length, client gone)
leave the KV cache at once, so the step gets cheaper as the batch drains. Requests arriving while
a batch runs wait for the next one (batch-at-a-time, not continuous joining): simple, exact to
time, and on CPU the decode step is what costs. transformers' own continuous batching was
measured first and rejected for CPU (see the engine README section / the issue notes).

Phase definitions (``perf_counter`` on the worker thread; all per request):

- ``queue``    = submit → its batch is admitted (time spent waiting in the engine queue).
- ``prompt``   = admission → first token sampled (the batch's prefill forward plus sampling;
  shared by the batch's requests, as prefill really is).
- ``predicted``= first token sampled → last token sampled (the decode steps).
- ``predicted_n`` counts every generated token, the first one and a final stop token included,
  and equals ``usage.completion_tokens``; ``predicted_per_token_ms`` = predicted_ms /
  predicted_n, as llama.cpp computes it.
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


@dataclass
class Timings:
    queue_ms: float
    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    batch_size: int

    def as_dict(self) -> dict[str, Any]:
        """llama.cpp's ``timings`` object plus ``queue_ms`` and ``batch_size``."""
        pn, pms, gn, gms = self.prompt_n, self.prompt_ms, self.predicted_n, self.predicted_ms
        return {
            "queue_ms": round(self.queue_ms, 3),
            "prompt_n": pn, "prompt_ms": round(pms, 3),
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
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for h in self._waiting:
                        h.put(RuntimeError("engine shutting down"))
                    return
                batch = [self._waiting.popleft()
                         for _ in range(min(self.max_batch, len(self._waiting)))]
                self.running = len(batch)
            t0 = time.perf_counter()
            try:
                self._run_batch(batch)
            except Exception as e:  # a failed batch fails its requests, not the engine
                for h in batch:
                    h.put(e)
            finally:
                self.busy_seconds += time.perf_counter() - t0
                self.running = 0

    def _warm_up(self) -> None:
        import torch

        with torch.inference_mode():
            ids = torch.tensor([[self.tok.pad_token_id or 0] * 4], device=self.device)
            self.model(input_ids=ids)

    def _run_batch(self, batch: list[Handle]) -> None:
        import torch
        from transformers import DynamicCache

        t_admit = time.perf_counter()
        rows = [_Row(h) for h in batch]
        n = len(rows)
        self.batches += 1
        self.max_batch_seen = max(self.max_batch_seen, n)
        width = max(len(h.req.prompt_ids) for h in batch)
        pad = self.tok.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (width - len(h.req.prompt_ids)) + h.req.prompt_ids
                                  for h in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(h.req.prompt_ids)) + [1] * len(h.req.prompt_ids)
                             for h in batch], device=self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        active = list(range(n))  # row index for each batch position still in the cache
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                                past_key_values=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1, :]
            while True:
                tokens = self._sample(logits, [rows[i].handle.req for i in active])
                now = time.perf_counter()
                keep = []
                for b, i in enumerate(active):
                    row = rows[i]
                    if not row.ids:
                        row.t_first = now
                    row.t_last = now
                    row.ids.append(tokens[b])
                    self._advance(row)
                    if row.done:
                        self._finish(row, t_admit, n)
                    else:
                        keep.append(b)
                if not keep:
                    return
                if len(keep) < len(active):
                    idx = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(idx)
                    mask, pos = mask[idx], pos[idx]
                    active = [active[b] for b in keep]
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
                pos = pos[:, -1:] + 1
                step = torch.tensor([[rows[i].ids[-1]] for i in active], device=self.device)
                logits = self.model(input_ids=step, attention_mask=mask, position_ids=pos,
                                    past_key_values=cache, use_cache=True).logits[:, -1, :]

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
        hit_stop_id = row.ids[-1] in self.stop_ids
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

    def _finish(self, row: _Row, t_admit: float, batch_size: int) -> None:
        h = row.handle
        t = Timings(queue_ms=(t_admit - h.t_submit) * 1000, prompt_n=len(h.req.prompt_ids),
                    prompt_ms=(row.t_first - t_admit) * 1000, predicted_n=len(row.ids),
                    predicted_ms=(row.t_last - row.t_first) * 1000, batch_size=batch_size)
        self.completed += 1
        h.put(Finished(row.done, row.text, t))
