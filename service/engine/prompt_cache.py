"""Keys and values of prompt prefixes already computed, reused by later prompts that start the same way.

Designed prompts share long beginnings: the chat template, the knowledge header and, for patients with the
same likely disease, the whole brief; only the question differs at the end. The cache keeps prefilled
prompts' keys/values in blocks of `BLOCK` tokens, in a tree (a block is found under the block before it, so
a match is exact token for token), and a new prompt prefills only what follows its longest cached prefix.
Least recently used blocks go first when the byte budget is full; a block's ancestors are always more
recent than it, so only leaves are ever dropped and every remaining chain stays whole.

Only the part of a prompt without patient text is kept (the engine passes a `limit`: the chat template's start
and the designed message's brief, never the question or the history), so no patient's words stay in memory
and a later request's speed says nothing about another patient's question.

Only for models whose keys/values at a position depend on the tokens before it alone (causal attention with
positions 0, 1, 2, ...): ChatGLM-6B's prompt attends both ways, so a prefix's keys change with what follows.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from functools import cached_property

import torch

BLOCK = 32  # tokens a block holds: the granularity of a match

LayersKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) of (1, kv heads, tokens, head dim)


@dataclass(eq=False)
class _Node:
    key: tuple[int, tuple[int, ...]]  # (parent node id, this block's tokens)
    id: int
    layers: LayersKV
    bytes: int
    parent: _Node | None
    children: int = 0


@dataclass
class CachedPrefix:
    """The longest cached beginning of a prompt: `length` tokens; their keys/values are concatenated only when
    a prefill asks for them (once per group of rows that share this beginning)."""

    length: int
    path: list[_Node] = field(repr=False)

    @property
    def node(self) -> _Node:
        return self.path[-1]

    @cached_property
    def layers(self) -> LayersKV:
        return [(torch.cat([n.layers[i][0] for n in self.path], dim=2),
                 torch.cat([n.layers[i][1] for n in self.path], dim=2)) for i in range(len(self.path[0].layers))]


class PromptCache:
    """Blocks of prompt keys/values in a tree, within a byte budget (least recently used leaves go first)."""

    def __init__(self, max_bytes: int, block: int = BLOCK) -> None:
        self.max_bytes = max_bytes
        self.block = block
        self.bytes = 0
        self._nodes: dict[tuple[int, tuple[int, ...]], _Node] = {}
        self._lru: collections.OrderedDict[int, _Node] = collections.OrderedDict()  # least recent first
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._nodes)

    def match(self, ids: list[int], limit: int) -> CachedPrefix | None:
        """The longest cached prefix of ids in whole blocks within the first `limit` tokens, leaving at least
        one token to prefill."""
        path = self._path(ids, limit=min(limit, len(ids) - 1))
        if not path:
            return None
        self._touch(path[-1])
        return CachedPrefix(length=len(path) * self.block, path=path)

    def insert(self, ids: list[int], start: int, layers: LayersKV, limit: int,
               after: CachedPrefix | None = None) -> None:
        """Keep the whole blocks of ids[start:limit] (start: a block boundary, 0 or after.length); layers hold
        the keys/values of ids[start:] as (1, kv heads, len(ids) - start, head dim)."""
        if self.max_bytes <= 0:
            return
        parent = after.node if after is not None else None
        if parent is not None and self._nodes.get(parent.key) is not parent:
            return  # the prefix it extends was dropped meanwhile: its blocks could never be found
        for begin in range(start, min(limit, len(ids)) - self.block + 1, self.block):
            key = (parent.id if parent else 0, tuple(ids[begin:begin + self.block]))
            node = self._nodes.get(key)
            if node is None:
                offset = begin - start
                blocks = [(k[:, :, offset:offset + self.block].clone(), v[:, :, offset:offset + self.block].clone())
                          for k, v in layers]
                size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in blocks)
                node = _Node(key=key, id=next(self._ids), layers=blocks, bytes=size, parent=parent)
                self._nodes[key] = node
                self._lru[node.id] = node
                self.bytes += size
                if parent is not None:
                    parent.children += 1
            parent = node
        if parent is not None:
            self._touch(parent)
            self._evict()

    def clear(self) -> None:
        """Forget everything (after a failure to store: a cache must never fail a request)."""
        self._nodes.clear()
        self._lru.clear()
        self.bytes = 0

    def _path(self, ids: list[int], limit: int) -> list[_Node]:
        path: list[_Node] = []
        parent_id = 0
        for begin in range(0, limit - self.block + 1, self.block):
            node = self._nodes.get((parent_id, tuple(ids[begin:begin + self.block])))
            if node is None:
                break
            path.append(node)
            parent_id = node.id
        return path

    def _touch(self, node: _Node | None) -> None:
        # Deepest first, so every block is less recent than the blocks before it.
        while node is not None:
            self._lru.move_to_end(node.id)
            node = node.parent

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._lru:
            _, node = self._lru.popitem(last=False)
            assert node.children == 0, "the least recently used block is always a leaf"
            del self._nodes[node.key]
            self.bytes -= node.bytes
            if node.parent is not None:
                node.parent.children -= 1
