"""Read-outs from a UNet that many calls share at once (a server's threads, a web app).

Recording attention or features means installing something on the UNet's layers
(attention processors, forward hooks). The UNet belongs to one model that several
threads may call at the same time, so what is installed must not hold any one
call's data. ``SharedInstrumentation`` installs it once while at least one call
needs it (and restores the UNet when the last one is done), and each call hands it
its own sink through a ``ContextVar``: every thread sees only the sink of the call
it is running, so concurrent calls never write into each other's results.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from typing import Any, Callable, Dict, Iterator, Optional

from torch import nn

_REGISTRY_LOCK = threading.Lock()
_REGISTRY: "weakref.WeakKeyDictionary[nn.Module, Dict[str, SharedInstrumentation]]" = weakref.WeakKeyDictionary()


class SharedInstrumentation:
    """Something installed on a shared module while any call uses it, routing each call to its own sink.

    Args:
        name: what is installed (used in the context variable's name).
        install: ``install(self) -> uninstall``: puts the instrumentation in place (it reads
            ``self.current()`` when it runs) and returns the function that takes it away.
    """

    def __init__(self, name: str, install: Callable[["SharedInstrumentation"], Callable[[], None]]):
        self._install = install
        self._sink: contextvars.ContextVar = contextvars.ContextVar(name, default=None)
        self._lock = threading.Lock()
        self._users = 0
        self._uninstall: Optional[Callable[[], None]] = None

    def current(self) -> Any:
        """The sink of the call running in this thread (or context), None outside any."""
        return self._sink.get()

    @contextlib.contextmanager
    def active(self, sink: Any) -> Iterator[Any]:
        """Within the block, this thread's calls of the module feed ``sink``."""
        with self._lock:
            if self._users == 0:
                self._uninstall = self._install(self)
            self._users += 1
        token = self._sink.set(sink)
        try:
            yield sink
        finally:
            self._sink.reset(token)
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    uninstall, self._uninstall = self._uninstall, None
                    uninstall()


def shared_instrumentation(
    module: nn.Module, name: str, install: Callable[[SharedInstrumentation], Callable[[], None]]
) -> SharedInstrumentation:
    """The one ``SharedInstrumentation`` called ``name`` of ``module`` (made on first use)."""
    with _REGISTRY_LOCK:
        per_module = _REGISTRY.setdefault(module, {})
        if name not in per_module:
            per_module[name] = SharedInstrumentation(f"{name}@{id(module):x}", install)
        return per_module[name]
