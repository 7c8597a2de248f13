"""A small least-recently-used cache for per-vocabulary work (text embeddings, prompts, prototypes)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable


class LRUCache:
    """At most ``size`` entries; the least recently used is evicted first."""

    def __init__(self, size: int):
        self.size = int(size)
        self._entries: "OrderedDict[Hashable, Any]" = OrderedDict()

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value of ``key``, computed (and stored, evicting the oldest) when missing."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = self._entries[key] = compute()
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
