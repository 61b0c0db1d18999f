"""The local engine: one worker thread owns the model and runs a continuous-batching decode loop.

Requests wait in a bounded queue. Between decode steps the worker prefills the waiting requests together
(one left-padded forward for the group) and writes their KV cache into the running batch's preallocated
buffers (batch.py), so a new request joins at the next step instead of waiting for the longest answer.
Each row keeps its own sampling settings and seed; a cancelled row leaves the batch before the next step.
Events reach the event loop once per step for all rows, not once per token per row.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llm.chat_format import build_prompt_ids
from llm.cpu_linear import can_pack, pack_linear_layers
from llm.loading import LoadedModel
from llm.positions import position_scheme_for

from .batch import BatchState
from .contract import Event
from .detokenize import IncrementalDecoder
from .prompt_cache import CachedPrefix, PromptCache
from .repetition import find_loop
from .sampling import UNIFORMS, RowSampling, sample
from .types import (
    EngineError,
    EngineNotReady,
    Finished,
    GenerationRequest,
    InvalidPrompt,
    NotSupported,
    PromptLogprobs,
    PromptTooLong,
    QueueFull,
    TokenDelta,
    TokenLogprob,
)

log = logging.getLogger(__name__)

# Padded tokens one grouped prefill may hold: bigger groups wait for the next step (bounds the pause
# that running rows see while arrivals are prefilled).
PREFILL_TOKEN_BUDGET = 4096


@dataclass
class StepTimings:
    """Where the worker's time goes, summed over the batched decode steps (perf_counter, always on: a few
    calls per step). Parts: cache = mask + in-place cache bookkeeping, forward = the model, sample = penalties
    and sampling, tokens = per-row token handling (detokenise, stop strings, guard), deliver = event hand-off."""

    steps: int = 0
    rows: int = 0  # rows summed over steps (rows / steps = mean batch)
    prefills: int = 0
    prefill_rows: int = 0
    prefill_s: float = 0.0
    cache_s: float = 0.0
    forward_s: float = 0.0
    sample_s: float = 0.0
    tokens_s: float = 0.0
    deliver_s: float = 0.0

    @property
    def decode_s(self) -> float:
        """The decode steps' time, all parts (prefills apart)."""
        return self.cache_s + self.forward_s + self.sample_s + self.tokens_s + self.deliver_s


@dataclass(eq=False)
class _Row:
    """One request inside the worker."""

    request: GenerationRequest
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Event]
    generator: torch.Generator
    decoder: IncrementalDecoder
    out_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    cancelled: bool = False
    done: bool = False
    pending: list[TokenLogprob] = field(default_factory=list)  # logprobs of tokens whose text is held back
    past: Any = None  # serial mode only: this row's own cache
    cacheable: int = 0  # leading prompt tokens without patient text: the prompt cache may keep these
    enqueued_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


class StreamHandle:
    """The API side of one request: iterate events; cancel() frees its slot at the next step."""

    def __init__(self, row: _Row) -> None:
        self._row = row
        self._queue = row.queue
        self.prompt_tokens = len(row.prompt_ids)

    async def open(self) -> None:
        """Nothing to connect for the local engine (the contract's first step)."""

    def cancel(self) -> None:
        self._row.cancelled = True

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while True:
                event = await self._queue.get()
                # A consumer that fell behind gets the deltas waiting for it as one (fewer SSE writes).
                while isinstance(event, TokenDelta) and not self._queue.empty():
                    following = self._queue.get_nowait()
                    if not isinstance(following, TokenDelta):
                        yield event
                        event = following
                        break
                    event = TokenDelta(event.text + following.text, event.logprobs + following.logprobs)
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            # A client that went away (CancelledError in the SSE generator) lands here.
            self._row.cancelled = True


class LocalEngine:
    """Owns the model; the only caller of its forward pass."""

    kind = "local"

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 8, max_queue: int = 64,
                 context_tokens: int = 2048, repetition_guard: bool = True, prompt_cache_mb: int = 0,
                 pack_cpu_linear: bool = True) -> None:
        self.model = loaded.model
        if pack_cpu_linear and loaded.device.type == "cpu":
            # oneDNN-packed weights: a decode step's few rows no longer pay MKL's per-call packing.
            packed = pack_linear_layers(self.model)
            log.info("%d linear layers packed for oneDNN on the CPU%s", packed,
                     "" if packed else f" (none: {can_pack(self.model) or 'no plain nn.Linear'})")
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.model_name = loaded.name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.context_tokens = context_tokens
        self.repetition_guard = repetition_guard
        self.eos_ids = self._eos_ids()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # A row that reaches the model's position window ends with "length" instead of failing the batch.
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        # transformers 5.2x renamed forward's `past_key_values` to `cache`; remote code keeps the old name.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.batched = self._supports_batched_cache()
        # Each row's position state comes from the model family's scheme (ChatGLM-6B's are 2-D).
        self.positions = position_scheme_for(self.model)
        # A P-tuning v2 prefix: per layer (k, v) of (1, kv_heads, P, head_dim), prepended to every row's cache.
        dtype = self.model.get_output_embeddings().weight.dtype
        self.prefix = ([(k.to(self.device, dtype), v.to(self.device, dtype)) for k, v in loaded.prefix]
                       if loaded.prefix else None)
        self.prefix_len = int(self.prefix[0][0].shape[2]) if self.prefix else 0
        if self.prefix and not self.batched:
            raise ValueError("a P-tuning prefix needs a model with a transformers DynamicCache (the batched path)")
        # Reused prompt beginnings (prompt_cache.py): batched path, causal prompts, no P-tuning prefix before them.
        # Off unless asked for (prompt_cache_mb; the service's setting DOCTORGLM_PROMPT_CACHE_MB is 512).
        refused = ("the model runs on the serial path" if not self.batched else
                   "a P-tuning prefix comes before every prompt" if self.prefix else
                   "its prompt attends both ways (a prefix's keys depend on what follows)"
                   if not self.positions.prompt_prefix_reusable else "")
        self.prompt_cache = PromptCache(prompt_cache_mb * 2**20) if prompt_cache_mb > 0 and not refused else None
        if prompt_cache_mb > 0 and refused:
            log.info("prompt cache off for this model: %s", refused)
        # transformers' sdpa takes a prepared 4-D bool mask as is, so the batch's mask is a view, never rebuilt;
        # other attention code (and the project's own model classes) gets the 2-D padding mask.
        self._bool_mask = (type(self.model).__module__.startswith("transformers.")
                           and getattr(self.model.config, "_attn_implementation", None) == "sdpa")
        self._waiting: collections.deque[_Row] = collections.deque()
        self._cv = threading.Condition()
        self._rows: list[_Row] = []
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event], Event]]] = {}
        self._stopping = False
        self._abort_message: str | None = None
        self._thread: threading.Thread | None = None
        self._batch = BatchState(max_batch_size, self.vocab_size, self.device, self._bool_mask)
        self._sampling: RowSampling | None = None
        self.steps = 0
        self.prompt_tokens = 0  # prefilled prompt tokens since start, cached ones included
        self.reused_tokens = 0  # of those, the ones whose keys/values came from the prompt cache
        self.timings = StepTimings()
        self.ready = False

    # ----- public API (event-loop side) -----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()
        self.ready = True

    def stop(self, timeout: float = 5.0) -> None:
        self.ready = False
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def abort_all(self, message: str) -> None:
        """End every queued and running request with an error event (used at the end of a drain)."""
        with self._cv:
            self._abort_message = message
            self._cv.notify_all()

    def stats(self) -> dict[str, int]:
        cache, t = self.prompt_cache, self.timings
        return {"active": len(self._rows), "queued": len(self._waiting), "prompt_tokens": self.prompt_tokens,
                "prompt_cache_reused_tokens": self.reused_tokens, "prompt_cache_bytes": cache.bytes if cache else 0,
                "decode_steps": t.steps, "decode_rows": t.rows, "decode_us": round(t.decode_s * 1e6),
                "prefills": t.prefills, "prefill_us": round(t.prefill_s * 1e6)}

    def model_summary(self) -> dict[str, str | None]:
        from llm.quantize import model_summary

        return dict(model_summary(self.model))

    def prepare(self, request: GenerationRequest) -> list[int]:
        """Prompt ids within the budget (raises PromptTooLong for a message too long on its own)."""
        if request.params.prompt_logprobs and not self.batched:
            # The serial path's prefill keeps only the last position's logits and always samples a token.
            raise NotSupported("echo (the prompt's log-probabilities) needs a model on the batched path; "
                               "this model's cache is not a transformers DynamicCache")
        budget = self.context_tokens - request.params.max_new_tokens
        if request.raw_ids is not None:
            ids = list(request.raw_ids)
            if not ids or any(not 0 <= i < self.vocab_size for i in ids):
                raise InvalidPrompt(f"prompt token ids must be a non-empty list within 0..{self.vocab_size - 1}")
        elif request.raw:
            ids = list(self.tokenizer(request.message)["input_ids"])
        if request.raw or request.raw_ids is not None:
            if not ids:
                raise InvalidPrompt("the prompt has no tokens")
            if len(ids) > max(budget, 1):
                raise PromptTooLong(f"the prompt has {len(ids)} tokens; with max_tokens "
                                    f"{request.params.max_new_tokens} the limit is {max(budget, 1)}")
            return ids
        return build_prompt_ids(self.tokenizer, request.history, request.message, max(budget, 1))

    def submit(self, request: GenerationRequest, prompt_ids: list[int] | None = None) -> StreamHandle:
        """Queue a request; raises QueueFull or EngineNotReady at once, never later."""
        if not self.ready:
            raise EngineNotReady("the engine is not accepting requests")
        ids = prompt_ids if prompt_ids is not None else self.prepare(request)
        if not ids:
            raise PromptTooLong("the prompt is empty")
        seed = request.params.seed if request.params.seed is not None else random.getrandbits(63)
        row = _Row(request=request, prompt_ids=list(ids), loop=asyncio.get_running_loop(), queue=asyncio.Queue(),
                   generator=torch.Generator().manual_seed(seed), decoder=IncrementalDecoder(self.tokenizer),
                   cacheable=self._cacheable_tokens(request, list(ids)))
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting)")
            self._waiting.append(row)
            self._cv.notify()
        return StreamHandle(row)

    def _cacheable_tokens(self, request: GenerationRequest, ids: list[int]) -> int:
        """How many leading prompt tokens hold no patient text: the chat template's start and the designed
        message's shared beginning (its brief), found as the tokens the prompt shares with the prompt of that
        beginning alone. None with history (earlier patient turns come first) or for raw prompts."""
        shared = request.shared_prefix
        if (self.prompt_cache is None or not shared or request.history or request.raw
                or request.raw_ids is not None or not request.message.startswith(shared)):
            return 0
        alone = build_prompt_ids(self.tokenizer, [], shared, len(ids) + 1)
        return next((i for i, (a, b) in enumerate(zip(ids, alone, strict=False)) if a != b), min(len(ids), len(alone)))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        handle = self.submit(request)
        async for event in handle:
            yield event

    # ----- worker side: the loop -----

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _supports_batched_cache(self) -> bool:
        """Batched decoding needs transformers' DynamicCache of plain layers; remote-code models run serially."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        try:
            with torch.inference_mode():
                ids = torch.tensor([[self.eos_ids and next(iter(self.eos_ids)) or 0]], device=self.device)
                out = self.model(input_ids=ids, use_cache=True)
            cache = _output_cache(out)
            return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)
        except Exception:  # noqa: BLE001 - any failure means: use the generic serial path
            return False

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._rows and self._abort_message is None:
                    self._cv.wait(timeout=0.5)
                if self._stopping:
                    break
                if self._abort_message is not None:
                    self._abort(self._abort_message)
                    continue
            try:
                with torch.inference_mode():
                    self._admit()
                    self._drop_finished()
                    self._deliver()
                    if self._rows:
                        self._decode_step()
                        self._drop_finished()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its rows, never the worker
                log.exception("decode step failed")
                for row in self._rows:
                    self._finish(row, "error", error=f"generation failed: {type(exc).__name__}")
                self._rows = []
                self._batch.clear()
            self._deliver()
        self._abort("the server is shutting down")

    def _abort(self, message: str) -> None:
        with self._cv:
            rows = [*self._rows, *self._waiting]
            self._waiting.clear()
            self._abort_message = None
        for row in rows:
            self._finish(row, "cancelled", error=message)
        self._rows = []
        self._batch.clear()
        self._deliver()

    # ----- admission: grouped prefill -----

    def _admit(self) -> None:
        group: list[_Row] = []
        with self._cv:
            while self._waiting and len(self._rows) + len(group) < self.max_batch_size:
                row = self._waiting.popleft()
                if row.cancelled:
                    self._finish(row, "cancelled")
                else:
                    group.append(row)
        if not self.batched:
            for row in group:
                self._guarded(self._serial_prefill, [row])
            return
        # Echo rows need every position's logits: they prefill alone. The rest share padded forwards, one per
        # cached prefix they start with (rows with the same cached beginning prefill only what follows it).
        groups: dict[int, tuple[CachedPrefix | None, list[_Row]]] = {}
        for row in group:
            if row.request.params.prompt_logprobs:
                self._guarded(self._prefill_group, [row])
                continue
            cached = self.prompt_cache.match(row.prompt_ids, row.cacheable) if self.prompt_cache else None
            groups.setdefault(cached.node.id if cached else 0, (cached, []))[1].append(row)
        for cached, rows in groups.values():
            prefill = functools.partial(self._prefill_group, cached=cached)
            chunk: list[_Row] = []
            for row in sorted(rows, key=lambda r: len(r.prompt_ids)):
                longest = len(row.prompt_ids)  # the forward's cache holds the cached part too
                if chunk and longest * (len(chunk) + 1) > PREFILL_TOKEN_BUDGET:
                    self._guarded(prefill, chunk)
                    chunk = []
                chunk.append(row)
            if chunk:
                self._guarded(prefill, chunk)

    def _guarded(self, prefill: Callable[[list[_Row]], None], rows: list[_Row]) -> None:
        """Prefill a group; when it fails, retry its rows one by one so that a bad request fails alone."""
        started = time.perf_counter()
        try:
            prefill(rows)
            self.prompt_tokens += sum(len(r.prompt_ids) for r in rows)
            self.timings.prefills += 1
            self.timings.prefill_rows += len(rows)
            self.timings.prefill_s += time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - the requests fail, never the worker
            if len(rows) > 1:
                for row in rows:
                    self._guarded(prefill, [row])
                return
            log.exception("prefill failed")
            self._finish(rows[0], "error", error=f"generation failed: {type(exc).__name__}")

    def _prefill_group(self, rows: list[_Row], cached: CachedPrefix | None = None) -> None:
        """One left-padded forward for rows that share a cache beginning: the P-tuning prefix (positions start at
        0 after it) or a cached prompt prefix (the prompt's first `skip` tokens: positions go on from it)."""
        n = len(rows)
        skip = cached.length if cached else 0
        before = self.prefix if self.prefix else (cached.layers if cached else None)
        p = self.prefix_len if self.prefix else skip
        lengths = [len(r.prompt_ids) - skip for r in rows]
        longest = max(lengths)
        ids = torch.full((n, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, p + longest), dtype=torch.long)
        mask[:, :p] = 1
        positions: list[torch.Tensor | None] = []
        for i, row in enumerate(rows):
            ids[i, longest - lengths[i]:] = torch.tensor(row.prompt_ids[skip:])
            mask[i, p + longest - lengths[i]:] = 1
            pos = self.positions.prefill(row.prompt_ids, self.device)
            positions.append(pos[..., skip:] if pos is not None else None)
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = any(length != longest for length in lengths)
        kwargs: dict[str, Any] = {}
        if padded or p:
            kwargs["attention_mask"] = mask
        if padded or p or any(pos is not None for pos in positions):
            # Positions start at 0 after a P-tuning prefix (what ChatGLM's P-tuning v2 does), never at P; after a
            # cached prompt prefix they go on from it; pads get 0.
            kwargs["position_ids"] = torch.cat([
                F.pad(pos if pos is not None else torch.arange(skip, skip + length, device=self.device)[None, :],
                      (longest - length, 0))
                for pos, length in zip(positions, lengths, strict=True)], dim=0)
        if before:
            from transformers import DynamicCache

            kwargs[self._cache_kw] = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
                                                                  for k, v in before])
        echo = rows[0].request.params.prompt_logprobs
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=0 if echo else 1, **kwargs)
        if echo:
            self._emit(rows[0], PromptLogprobs(self._prompt_logprobs(rows[0], out.logits[0])))
        logits = self._suppress_eos(out.logits[:, -1, :], rows)
        tokens = sample(logits, self._row_sampling(rows), None, self._uniforms(rows))
        logprobs = self._token_logprobs(rows, out.logits[:, -1, :], tokens)
        cache = _output_cache(out)
        if self.prompt_cache is not None and not echo:
            self._keep_prompts(rows, cache, skip, [p + longest - length for length in lengths], cached)
        first = torch.cat([self.positions.first(r.prompt_ids, self.device) for r in rows], dim=0)
        # Nothing that can fail comes after the rows join (`_accept` guards itself): a failed group is retried
        # row by row (_guarded), and a row already in the batch would then be there twice.
        self._batch.add([(layer.keys, layer.values) for layer in cache.layers], mask, first, tokens)
        self._rows.extend(rows)
        self.reused_tokens += skip * n
        self._sampling = None
        now = time.perf_counter()
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            row.first_token_at = now
            if row.request.params.max_new_tokens <= 0:  # echo only: the prompt's logprobs were all it asked
                self._finish(row, "length")
                continue
            self._accept(row, token, logprobs[i] if logprobs else None)

    def _keep_prompts(self, rows: list[_Row], cache: Any, skip: int, own: list[int],
                      cached: CachedPrefix | None) -> None:
        """Store the rows' new cacheable blocks (own[i]: where row i's tokens after `skip` start in the forward's
        cache). A cache that cannot store (out of memory) is emptied: it must never fail a request."""
        try:
            for i, row in enumerate(rows):
                self.prompt_cache.insert(row.prompt_ids, skip,
                                         [(layer.keys[i:i + 1, :, own[i]:], layer.values[i:i + 1, :, own[i]:])
                                          for layer in cache.layers], row.cacheable, after=cached)
        except (RuntimeError, MemoryError) as exc:  # torch's out-of-memory errors are RuntimeErrors
            log.warning("prompt cache emptied: could not store a prompt (%s)", type(exc).__name__)
            self.prompt_cache.clear()

    def _serial_prefill(self, rows: list[_Row]) -> None:
        row = rows[0]
        ids = torch.tensor([row.prompt_ids], device=self.device)
        out = self.model(**self.model.prepare_inputs_for_generation(ids, use_cache=True))
        logits = self._suppress_eos(out.logits[:, -1, :], [row])
        token = sample(logits, self._row_sampling([row]), None, self._uniforms([row]))
        row.first_token_at = time.perf_counter()
        row.past = _output_cache(out)
        self._rows.append(row)
        logprobs = self._token_logprobs([row], out.logits[:, -1, :], token)
        self._accept(row, int(token[0]), logprobs[0] if logprobs else None)

    # ----- one decode step -----

    def _decode_step(self) -> None:
        self.steps += 1
        if not self.batched:
            self._serial_step()
            return
        batch, timings = self._batch, self.timings
        t0 = time.perf_counter()
        if self._sampling is None:
            self._sampling = self._row_sampling(self._rows)
        mask = batch.step_mask()
        t1 = time.perf_counter()
        out = self.model(input_ids=batch.next[:, None], attention_mask=mask,
                         position_ids=self.positions.as_input(batch.positions), use_cache=True,
                         **{self._cache_kw: batch.cache})
        raw = out.logits[:, -1, :]
        t2 = time.perf_counter()
        logits = self._suppress_eos(raw, self._rows)
        tokens = sample(logits, self._sampling, batch.seen[:batch.rows], self._uniforms(self._rows))
        values = tokens.tolist()
        t3 = time.perf_counter()
        batch.advance(tokens, self.positions.advance(batch.positions))
        t4 = time.perf_counter()
        logprobs = self._token_logprobs(self._rows, raw, tokens)
        for i, (row, token) in enumerate(zip(self._rows, values, strict=True)):
            self._accept(row, token, logprobs[i] if logprobs else None)
        t5 = time.perf_counter()
        timings.steps += 1
        timings.rows += len(self._rows)
        timings.cache_s += (t1 - t0) + (t4 - t3)
        timings.forward_s += t2 - t1
        timings.sample_s += t3 - t2
        timings.tokens_s += t5 - t4

    def _serial_step(self) -> None:
        """Generic path for models whose cache cannot be batched: one forward per row, round robin."""
        # Counted like a batched step (one round over the rows), so that /metrics' decode seconds / steps is a step
        # here too; without it decode_steps stays 0 while decode_us grows by the deliveries.
        started = time.perf_counter()
        self.timings.steps += 1
        self.timings.rows += sum(1 for row in self._rows if not (row.done or row.cancelled))
        try:
            self._serial_round()
        finally:
            self.timings.forward_s += time.perf_counter() - started

    def _serial_round(self) -> None:
        for row in self._rows:
            if row.done or row.cancelled:
                continue
            try:
                ids = torch.tensor([row.prompt_ids + row.out_ids], device=self.device)
                inputs = self.model.prepare_inputs_for_generation(
                    ids, attention_mask=torch.ones_like(ids), use_cache=True, **self._serial_cache_kwargs(row.past))
                out = self.model(**inputs)
                row.past = _output_cache(out)
                seen = torch.zeros((1, out.logits.shape[-1]), dtype=torch.bool, device=self.device)
                if row.out_ids:
                    seen[0, torch.tensor(row.out_ids, device=self.device)] = True
                logits = self._suppress_eos(out.logits[:, -1, :], [row])
                token = sample(logits, self._row_sampling([row]), seen, self._uniforms([row]))
                logprobs = self._token_logprobs([row], out.logits[:, -1, :], token)
                self._accept(row, int(token[0]), logprobs[0] if logprobs else None)
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                log.exception("serial decode failed")
                self._finish(row, "error", error=f"generation failed: {type(exc).__name__}")

    def _serial_cache_kwargs(self, past: Any) -> dict[str, Any]:
        """transformers 5.2x slices the inputs by next_sequence_length and calls the cache `cache`;
        remote code keeps `past_key_values` and slices by itself."""
        if self._cache_kw == "cache":
            return {"cache": past, "next_sequence_length": 1}
        return {"past_key_values": past}

    # ----- sampling helpers -----

    def _row_sampling(self, rows: list[_Row]) -> RowSampling:
        params = [r.request.params for r in rows]
        return RowSampling([p.temperature for p in params], [p.top_p for p in params],
                           [p.top_k for p in params], [p.repetition_penalty for p in params], self.device)

    def _uniforms(self, rows: list[_Row]) -> torch.Tensor | None:
        if all(r.request.params.greedy for r in rows):
            return None
        # Each row's uniforms (its rejection proposals, then a fallback's) come from its own generator only.
        return torch.stack([torch.rand(UNIFORMS, generator=r.generator) for r in rows]).to(self.device)

    def _suppress_eos(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        early = [i for i, r in enumerate(rows) if len(r.out_ids) < r.request.params.min_new_tokens]
        if early and self.eos_ids:
            logits = logits.clone()
            eos = torch.tensor(sorted(self.eos_ids), device=logits.device)
            logits[torch.tensor(early, device=logits.device)[:, None], eos[None, :]] = float("-inf")
        return logits

    def _token_logprobs(self, rows: list[_Row], logits: torch.Tensor,
                        tokens: torch.Tensor) -> list[TokenLogprob | None] | None:
        """Each asking row's token log-probability and top alternatives (the model's own distribution)."""
        wanted = [i for i, r in enumerate(rows) if r.request.params.logprobs is not None]
        if not wanted:
            return None
        result: list[TokenLogprob | None] = [None] * len(rows)
        logp = torch.log_softmax(logits[wanted].float(), dim=-1)
        chosen = logp.gather(1, tokens[wanted][:, None]).squeeze(1).tolist()
        for j, i in enumerate(wanted):
            k = rows[i].request.params.logprobs or 0
            top = logp[j].topk(k) if k else None
            result[i] = TokenLogprob(int(tokens[i]), self._piece(int(tokens[i])), chosen[j],
                                     tuple((int(t), self._piece(int(t)), float(v))
                                           for v, t in zip(top.values.tolist(), top.indices.tolist(), strict=True))
                                     if top is not None else ())
        return result

    def _prompt_logprobs(self, row: _Row, logits: torch.Tensor) -> tuple[TokenLogprob, ...]:
        """The prompt tokens' log-probabilities from one prefill (echo); the first token has none."""
        ids = row.prompt_ids
        logits = logits[-len(ids):]
        k = row.request.params.logprobs or 0
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)
        target = torch.tensor(ids[1:], device=logp.device)
        chosen = logp.gather(1, target[:, None]).squeeze(1).tolist() if len(ids) > 1 else []
        tops = logp.topk(k, dim=-1) if k and len(ids) > 1 else None
        out = [TokenLogprob(ids[0], self._piece(ids[0]), None)]
        for j, token in enumerate(ids[1:]):
            top = (tuple((int(t), self._piece(int(t)), float(v))
                         for v, t in zip(tops.values[j].tolist(), tops.indices[j].tolist(), strict=True))
                   if tops is not None else ())
            out.append(TokenLogprob(token, self._piece(token), chosen[j], top))
        return tuple(out)

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ----- tokens to events -----

    def _accept(self, row: _Row, token: int, logprob: TokenLogprob | None = None) -> None:
        """Take one sampled token for a row: stream its text and decide whether the row is finished."""
        if row.done:
            return
        try:
            params = row.request.params
            if token in self.eos_ids:
                row.decoder.flush()
                self._flush(row, len(row.decoder.text))
                self._finish(row, "stop")
                return
            row.out_ids.append(token)
            if logprob is not None:
                row.pending.append(logprob)
            row.decoder.push(token)
            text = row.decoder.text
            for stop in params.stop:
                index = text.find(stop, max(0, row.emitted_chars - len(stop)))
                if index >= 0:
                    self._flush(row, index)
                    self._finish(row, "stop")
                    return
            holdback = max((len(s) for s in params.stop), default=1) - 1
            self._flush(row, len(text) - holdback)
            full = bool(self.max_positions) and len(row.prompt_ids) + len(row.out_ids) >= self.max_positions
            if len(row.out_ids) >= params.max_new_tokens or full:
                row.decoder.flush()
                self._flush(row, len(row.decoder.text))
                self._finish(row, "length")
            elif self.repetition_guard and len(row.out_ids) % 4 == 0 and find_loop(row.out_ids):
                self._flush(row, len(text))
                self._finish(row, "repetition")
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            log.exception("token handling failed")
            self._finish(row, "error", error=f"generation failed: {type(exc).__name__}")

    def _flush(self, row: _Row, upto: int) -> None:
        if upto > row.emitted_chars:
            self._emit(row, TokenDelta(row.decoder.text[row.emitted_chars:upto], tuple(row.pending)))
            row.emitted_chars = upto
            row.pending = []

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        if row.done:
            return
        row.done = True
        if row.pending:  # logprobs of tokens that completed no text (or whose text a stop string cut)
            self._emit(row, TokenDelta("", tuple(row.pending)))
            row.pending = []
        self._emit(row, Finished(finish_reason=reason, prompt_tokens=len(row.prompt_ids),
                                 completion_tokens=len(row.out_ids), error=error))

    def _emit(self, row: _Row, event: Event) -> None:
        self._outbox.setdefault(row.loop, []).append((row.queue, event))

    def _deliver(self) -> None:
        """Hand this step's events to each event loop in one call (one wake-up per loop, not per token)."""
        if not self._outbox:
            return
        started = time.perf_counter()
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            # The event loop may already be closed at shutdown; nobody is listening then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)
        self.timings.deliver_s += time.perf_counter() - started

    def _drop_finished(self) -> None:
        for row in self._rows:
            if row.cancelled and not row.done:
                self._finish(row, "cancelled")
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self._sampling = None
        if self.batched:
            self._batch.keep(keep)


def _put_all(items: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


__all__ = ["EngineError", "LocalEngine", "StreamHandle"]
