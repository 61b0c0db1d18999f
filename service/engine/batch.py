"""The running batch's tensors, preallocated: a KV cache written in place, the padding mask, positions.

Rows sit in slots 0..B-1 of buffers shaped (max_rows, kv_heads, capacity, head_dim). Every row's cache
ends at the same column `end` (rows are right-aligned, so shorter rows have padding on the left), and
a decode step writes one column for all rows at once: nothing is concatenated per step, and the mask
changes by one column. Joins and leaves copy only at that moment; the capacity doubles when full, after
first dropping leading columns that are padding for every row.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One decoder layer's keys/values for the batch; `update` writes the step's column in place."""

    is_sliding = False

    def __init__(self, owner: BatchCache, index: int) -> None:
        super().__init__()
        self.owner = owner
        self.index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self.owner
        rows, q = key_states.shape[0], key_states.shape[2]
        keys, values = owner.keys[self.index], owner.values[self.index]
        keys[:rows, :, owner.end:owner.end + q] = key_states
        values[:rows, :, owner.end:owner.end + q] = value_states
        return (keys[:rows, :, owner.start:owner.end + q], values[:rows, :, owner.start:owner.end + q])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.end - self.owner.start

    def get_max_length(self) -> int:
        return -1


class BatchCache(Cache):
    """The batch's KV cache (a transformers Cache, so the model's own attention code reads and writes it)."""

    def __init__(self, layers_kv: list[tuple[torch.Tensor, torch.Tensor]], max_rows: int, capacity: int) -> None:
        first = layers_kv[0][0]
        self.keys = [first.new_zeros((max_rows, k.shape[1], capacity, k.shape[3])) for k, _ in layers_kv]
        self.values = [first.new_zeros((max_rows, v.shape[1], capacity, v.shape[3])) for _, v in layers_kv]
        self.start = 0  # first column any row uses
        self.end = 0  # one past the last written column (the same for every row)
        super().__init__(layers=[SlotLayer(self, i) for i in range(len(layers_kv))])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def move(self, rows: int, to_start: int, capacity: int) -> None:
        """Place the used columns [start, end) of the first `rows` slots at to_start, in buffers of this capacity."""
        width = self.end - self.start
        for buffers in (self.keys, self.values):
            for i, buf in enumerate(buffers):
                if capacity != buf.shape[2]:
                    target = buf.new_zeros((buf.shape[0], buf.shape[1], capacity, buf.shape[3]))
                    target[:rows, :, to_start:to_start + width] = buf[:rows, :, self.start:self.end]
                    buffers[i] = target
                elif to_start != self.start:
                    buf[:rows, :, to_start:to_start + width] = buf[:rows, :, self.start:self.end].clone()
        self.start, self.end = to_start, to_start + width

    def write_rows(self, slot: int, layers_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a prefilled group's cache (n rows, ending at the batch's end column) into slots slot.."""
        for buf_k, buf_v, (k, v) in zip(self.keys, self.values, layers_kv, strict=True):
            n, length = k.shape[0], k.shape[2]
            buf_k[slot:slot + n, :, self.end - length:self.end] = k
            buf_v[slot:slot + n, :, self.end - length:self.end] = v

    def keep(self, index: torch.Tensor) -> None:
        """Keep the slots in index (in that order) as slots 0..len(index)-1."""
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf[:len(index), :, self.start:self.end] = buf[index, :, self.start:self.end]


class BatchState:
    """Everything one decode step of the batch needs, kept between steps."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device, bool_mask: bool) -> None:
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.device = device
        self.bool_mask = bool_mask  # sdpa takes a 4-D bool mask as is: no mask is rebuilt per step
        self.rows = 0
        self.lengths: list[int] = []  # columns each row spans (prefix + prompt + generated, holes included)
        self.holes: list[bool] = []  # rows whose span has masked columns inside (padding of a grouped prefill)
        self.cache: BatchCache | None = None
        self.mask: torch.Tensor | None = None  # (max_rows, capacity) bool: True where a row has a token
        self.seen = torch.zeros((max_rows, vocab_size), dtype=torch.bool, device=device)
        self.positions: torch.Tensor | None = None  # each row's position state (first dim = row)
        self.next: torch.Tensor | None = None  # the token each row feeds to the next step

    # ----- changes of batch -----

    def add(self, layers_kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
            positions: torch.Tensor, tokens: torch.Tensor) -> None:
        """Join n prefilled rows: their cache (n, heads, L, dim) per layer and 2-D mask (n, L)."""
        n, length = mask.shape
        if self.cache is None:
            self.cache = BatchCache(layers_kv, self.max_rows, capacity=max(256, 2 * length))
            self.mask = torch.zeros((self.max_rows, self.cache.capacity), dtype=torch.bool, device=self.device)
            self.cache.start = self.cache.end = length
        elif self.rows == 0:
            self.cache.start = self.cache.end = min(self.cache.end, self.cache.capacity - 1)
        if length > self.cache.end:
            self._move(self.cache.start + length - self.cache.end)  # make room on the left
        cache = self.cache
        slot = self.rows
        cache.write_rows(slot, layers_kv)
        self.mask[slot:slot + n] = False
        self.mask[slot:slot + n, cache.end - length:cache.end] = mask.bool()
        self.seen[slot:slot + n] = False
        self.seen[torch.arange(slot, slot + n, device=self.device), tokens] = True
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=0)
        self.next = tokens if self.next is None else torch.cat([self.next, tokens], dim=0)
        self.rows += n
        self.lengths.extend([length] * n)
        holes = (~mask.bool()).any(dim=1).tolist()
        self.holes.extend(bool(h) for h in holes)
        cache.start = min(cache.start, cache.end - length) if slot else cache.end - length

    def keep(self, keep: list[int]) -> None:
        """Keep these rows (indices into the current batch), in order; the rest leave."""
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, device=self.device)
        cache = self.cache
        cache.keep(index)
        self.mask[:len(keep)] = self.mask[index]
        self.seen[:len(keep)] = self.seen[index]
        self.positions = self.positions[index]
        self.next = self.next[index]
        self.lengths = [self.lengths[i] for i in keep]
        self.holes = [self.holes[i] for i in keep]
        self.rows = len(keep)
        cache.start = cache.end - max(self.lengths)

    def clear(self) -> None:
        self.rows = 0
        self.lengths = []
        self.holes = []
        self.positions = self.next = None
        if self.cache is not None:
            # The buffers stay for the next batch; only the columns in use are forgotten.
            self.cache.start = self.cache.end

    # ----- one decode step -----

    def step_mask(self) -> torch.Tensor | None:
        """The attention mask for the next step (its new column is on for every row); None without padding."""
        cache = self.cache
        if cache.end + 1 > cache.capacity:
            width = cache.end - cache.start
            if width + 1 <= cache.capacity // 2:
                self._move(0)  # drop leading columns that no row uses any more
            else:
                self._move(0, capacity=2 * cache.capacity)
        self.mask[:self.rows, cache.end] = True
        if not any(self.holes) and all(length == self.lengths[0] for length in self.lengths):
            return None
        mask = self.mask[:self.rows, cache.start:cache.end + 1]
        return mask[:, None, None, :] if self.bool_mask else mask.long()

    def advance(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache.end += 1
        self.lengths = [length + 1 for length in self.lengths]
        self.positions = positions
        self.next = tokens
        self.seen[torch.arange(self.rows, device=self.device), tokens] = True

    def _move(self, to_start: int, capacity: int | None = None) -> None:
        cache = self.cache
        width = cache.end - cache.start
        capacity = max(capacity or cache.capacity, to_start + width + 1)
        if capacity > cache.capacity:
            capacity = max(capacity, 2 * cache.capacity)
        old_start = cache.start
        block = self.mask[:self.rows, old_start:old_start + width].clone()
        cache.move(self.rows, to_start, capacity)
        if capacity != self.mask.shape[1]:
            self.mask = self.mask.new_zeros((self.max_rows, capacity))
        self.mask[:self.rows] = False
        self.mask[:self.rows, to_start:to_start + width] = block
