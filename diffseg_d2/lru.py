"""A small least-recently-used cache for per-vocabulary work (text embeddings, prompts, prototypes)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable


class LRUCache:
    """At most ``size`` entries; the least recently used is evicted first.

    Safe to share between threads: lookups and evictions hold a lock; ``compute`` runs outside
    it, so two threads missing the same key may both compute it (the values are equal).
    """

    def __init__(self, size: int):
        self.size = int(size)
        self._entries: "OrderedDict[Hashable, Any]" = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value of ``key``, computed (and stored, evicting the oldest) when missing."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = compute()
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def __getstate__(self):
        # Copies (copy.deepcopy of a model, pickling for another process) get a lock of their own.
        with self._lock:
            return {"size": self.size, "_entries": OrderedDict(self._entries)}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
