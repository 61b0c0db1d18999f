"""The local engine: one worker thread owns the model and runs a continuous-batching decode loop.

Requests wait in a bounded queue; between decode steps the worker prefills waiting requests and
splices their KV cache into the running batch (left-padded), so a new request joins at the next
step instead of waiting for the longest answer. Each row keeps its own sampling settings and seed;
a cancelled row leaves the batch before the next step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
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
from llm.loading import LoadedModel
from llm.positions import position_scheme_for

from .detokenize import IncrementalDecoder
from .repetition import find_loop
from .sampling import RowSampling, sample
from .types import EngineError, EngineNotReady, Finished, GenerationRequest, QueueFull, TokenDelta

log = logging.getLogger(__name__)
Event = TokenDelta | Finished


@dataclass(eq=False)
class _Row:
    """One request inside the worker."""

    request: GenerationRequest
    prompt_ids: list[int]
    emit: Callable[[Event], None]
    generator: torch.Generator
    decoder: IncrementalDecoder
    out_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    cancelled: bool = False
    done: bool = False
    past: Any = None  # serial mode only: this row's own cache
    enqueued_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


class StreamHandle:
    """The API side of one request: iterate events; cancel() frees its slot at the next step."""

    def __init__(self, row: _Row, queue: asyncio.Queue[Event]) -> None:
        self._row = row
        self._queue = queue
        self.prompt_tokens = len(row.prompt_ids)

    def cancel(self) -> None:
        self._row.cancelled = True

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while True:
                event = await self._queue.get()
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
                 context_tokens: int = 2048, repetition_guard: bool = True) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.model_name = loaded.name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.context_tokens = context_tokens
        self.repetition_guard = repetition_guard
        self.eos_ids = self._eos_ids()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
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
        self._waiting: collections.deque[_Row] = collections.deque()
        self._cv = threading.Condition()
        self._rows: list[_Row] = []
        self._stopping = False
        self._abort_message: str | None = None
        self._thread: threading.Thread | None = None
        self._reset_batch()
        self.steps = 0
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
        return {"active": len(self._rows), "queued": len(self._waiting)}

    def prepare(self, request: GenerationRequest) -> list[int]:
        """Prompt ids within the budget (raises PromptTooLong for a message too long on its own)."""
        budget = self.context_tokens - request.params.max_new_tokens
        return build_prompt_ids(self.tokenizer, request.history, request.message, max(budget, 1))

    def submit(self, request: GenerationRequest, prompt_ids: list[int] | None = None) -> StreamHandle:
        """Queue a request; raises QueueFull or EngineNotReady at once, never later."""
        if not self.ready:
            raise EngineNotReady("the engine is not accepting requests")
        ids = prompt_ids if prompt_ids is not None else self.prepare(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            # The event loop may already be closed at shutdown; nobody is listening then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, event)

        seed = request.params.seed if request.params.seed is not None else random.getrandbits(63)
        row = _Row(request=request, prompt_ids=ids, emit=emit,
                   generator=torch.Generator().manual_seed(seed), decoder=IncrementalDecoder(self.tokenizer))
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting)")
            self._waiting.append(row)
            self._cv.notify()
        return StreamHandle(row, queue)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        handle = self.submit(request)
        async for event in handle:
            yield event

    # ----- worker side -----

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
        """Batched splicing needs transformers' DynamicCache of plain layers; remote-code models run serially."""
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

    def _reset_batch(self) -> None:
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._next: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        self._sampling: RowSampling | None = None

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
                    if self._rows:
                        self._decode_step()
                        self._drop_finished()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its rows, never the worker
                log.exception("decode step failed")
                for row in self._rows:
                    self._finish(row, "error", error=f"generation failed: {type(exc).__name__}")
                self._rows = []
                self._reset_batch()
        self._abort("the server is shutting down")

    def _abort(self, message: str) -> None:
        with self._cv:
            rows = [*self._rows, *self._waiting]
            self._waiting.clear()
            self._abort_message = None
        for row in rows:
            self._finish(row, "cancelled", error=message)
        self._rows = []
        self._reset_batch()

    def _admit(self) -> None:
        while len(self._rows) < self.max_batch_size:
            with self._cv:
                if not self._waiting:
                    return
                row = self._waiting.popleft()
            if row.cancelled:
                self._finish(row, "cancelled")
                continue
            try:
                self._prefill(row)
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                log.exception("prefill failed")
                self._finish(row, "error", error=f"generation failed: {type(exc).__name__}")

    def _prefill(self, row: _Row) -> None:
        ids = torch.tensor([row.prompt_ids], device=self.device)
        length = ids.shape[1] + self.prefix_len
        out = self._batched_prefill(row.prompt_ids, ids) if self.batched else \
            self.model(**self.model.prepare_inputs_for_generation(ids, use_cache=True))
        logits = out.logits[:, -1, :]
        params = row.request.params
        one = RowSampling([params.temperature], [params.top_p], [params.top_k], [params.repetition_penalty],
                          self.device)
        logits = self._suppress_eos(logits, [row])
        token = sample(logits, one, None, self._uniforms([row]))
        row.first_token_at = time.perf_counter()
        if self.batched:
            self._splice(row, _output_cache(out), length, token)
        else:
            row.past = _output_cache(out)
            self._rows.append(row)
        self._accept(row, int(token[0]))

    def _batched_prefill(self, prompt_ids: list[int], ids: torch.Tensor) -> Any:
        """The prompt's forward for the batched path: family positions, and the prefix in the cache."""
        kwargs: dict[str, Any] = {}
        positions = self.positions.prefill(prompt_ids, self.device)
        if self.prefix:
            from transformers import DynamicCache

            kwargs[self._cache_kw] = DynamicCache(ddp_cache_data=self.prefix)
            kwargs["attention_mask"] = torch.ones((1, self.prefix_len + ids.shape[1]), dtype=torch.long,
                                                  device=self.device)
            # Positions start at 0 after a prefix (what ChatGLM's P-tuning v2 does), never at P.
            if positions is None:
                positions = torch.arange(ids.shape[1], device=self.device)[None, :]
        if positions is not None:
            kwargs["position_ids"] = positions
        return self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)

    def _splice(self, row: _Row, cache: Any, length: int, token: torch.Tensor) -> None:
        """Add a prefilled row to the batch, left-padding whichever side is shorter."""
        new_mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        new_seen = torch.zeros((1, self.vocab_size), dtype=torch.bool, device=self.device)
        new_seen[0, token] = True  # the prefill's token counts for the repetition penalty, as on the serial path
        position = self.positions.first(row.prompt_ids, self.device)
        if self._cache is None:
            self._cache, self._mask, self._positions, self._next, self._seen = (
                cache, new_mask, position, token, new_seen)
        else:
            current = self._mask.shape[1]
            if length < current:
                _pad_cache(cache, current - length)
                new_mask = F.pad(new_mask, (current - length, 0))
            elif length > current:
                _pad_cache(self._cache, length - current)
                self._mask = F.pad(self._mask, (length - current, 0))
            for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
                mine.values = torch.cat([mine.values, theirs.values], dim=0)
            self._mask = torch.cat([self._mask, new_mask], dim=0)
            self._positions = torch.cat([self._positions, position], dim=0)
            self._next = torch.cat([self._next, token])
            self._seen = torch.cat([self._seen, new_seen], dim=0)
        self._rows.append(row)
        self._sampling = None

    def _decode_step(self) -> None:
        self.steps += 1
        if not self.batched:
            self._serial_step()
            return
        if self._sampling is None:
            self._sampling = self._row_sampling(self._rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        out = self.model(input_ids=self._next[:, None], attention_mask=self._mask,
                         position_ids=self.positions.as_input(self._positions), use_cache=True,
                         **{self._cache_kw: self._cache})
        self._cache = _output_cache(out)
        logits = self._suppress_eos(out.logits[:, -1, :], self._rows)
        tokens = sample(logits, self._sampling, self._seen, self._uniforms(self._rows))
        self._positions = self.positions.advance(self._positions)
        self._next = tokens
        self._seen[torch.arange(len(self._rows), device=self.device), tokens] = True
        for row, token in zip(self._rows, tokens.tolist(), strict=True):
            self._accept(row, token)

    def _serial_step(self) -> None:
        """Generic path for models whose cache cannot be spliced: one forward per row, round robin."""
        for row in self._rows:
            if row.done or row.cancelled:
                continue
            try:
                ids = torch.tensor([row.prompt_ids + row.out_ids], device=self.device)
                inputs = self.model.prepare_inputs_for_generation(
                    ids, attention_mask=torch.ones_like(ids), use_cache=True, **self._serial_cache_kwargs(row.past))
                out = self.model(**inputs)
                row.past = _output_cache(out)
                params = row.request.params
                one = RowSampling([params.temperature], [params.top_p], [params.top_k],
                                  [params.repetition_penalty], self.device)
                seen = torch.zeros((1, out.logits.shape[-1]), dtype=torch.bool, device=self.device)
                if row.out_ids:
                    seen[0, torch.tensor(row.out_ids, device=self.device)] = True
                logits = self._suppress_eos(out.logits[:, -1, :], [row])
                token = sample(logits, one, seen, self._uniforms([row]))
                self._accept(row, int(token[0]))
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                log.exception("serial decode failed")
                self._finish(row, "error", error=f"generation failed: {type(exc).__name__}")

    def _serial_cache_kwargs(self, past: Any) -> dict[str, Any]:
        """transformers 5.2x slices the inputs by next_sequence_length and calls the cache `cache`;
        remote code keeps `past_key_values` and slices by itself."""
        if self._cache_kw == "cache":
            return {"cache": past, "next_sequence_length": 1}
        return {"past_key_values": past}

    def _row_sampling(self, rows: list[_Row]) -> RowSampling:
        params = [r.request.params for r in rows]
        return RowSampling([p.temperature for p in params], [p.top_p for p in params],
                           [p.top_k for p in params], [p.repetition_penalty for p in params], self.device)

    def _uniforms(self, rows: list[_Row]) -> torch.Tensor | None:
        if all(r.request.params.greedy for r in rows):
            return None
        values = [float(torch.rand(1, generator=r.generator)) for r in rows]
        return torch.tensor(values, device=self.device)

    def _suppress_eos(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        early = [i for i, r in enumerate(rows) if len(r.out_ids) < r.request.params.min_new_tokens]
        if early and self.eos_ids:
            logits = logits.clone()
            eos = torch.tensor(sorted(self.eos_ids), device=logits.device)
            logits[torch.tensor(early, device=logits.device)[:, None], eos[None, :]] = float("-inf")
        return logits

    def _accept(self, row: _Row, token: int) -> None:
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
            row.emit(TokenDelta(row.decoder.text[row.emitted_chars:upto]))
            row.emitted_chars = upto

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        if row.done:
            return
        row.done = True
        row.emit(Finished(finish_reason=reason, prompt_tokens=len(row.prompt_ids),
                          completion_tokens=len(row.out_ids), error=error))

    def _drop_finished(self) -> None:
        for row in self._rows:
            if row.cancelled and not row.done:
                self._finish(row, "cancelled")
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self._sampling = None
        if not self.batched:
            return
        if not keep:
            self._reset_batch()
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        self._positions = self._positions[index]
        self._next = self._next[index]
        self._seen = self._seen[index]
        start = int(self._mask.any(dim=0).long().argmax())  # leading columns that are padding for every row
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:, :]
            layer.values = layer.values[index, :, start:, :]
        self._mask = self._mask[:, start:]


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _pad_cache(cache: Any, amount: int) -> None:
    for layer in cache.layers:
        layer.keys = F.pad(layer.keys, (0, 0, amount, 0))
        layer.values = F.pad(layer.values, (0, 0, amount, 0))


__all__ = ["EngineError", "LocalEngine", "StreamHandle"]
