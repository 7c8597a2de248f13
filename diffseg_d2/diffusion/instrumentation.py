"""Read-outs from a UNet that many calls share at once (a server's threads, a web app).

Recording attention or features means installing something on the UNet's layers
(attention processors, forward hooks). The UNet belongs to one model that several
threads may call at the same time, so what is installed must not hold any one
call's data. ``SharedInstrumentation`` installs it once while at least one call
needs it (and restores the module when the last one is done), and each call hands it
its own sink through a ``ContextVar``: every thread sees only the sink of the call
it is running, so concurrent calls never write into each other's results.

Lifetime: the registry maps a module to its instrumentations weakly, and nothing in
them holds the module between calls (``install`` receives it when a call starts), so
a model that is deleted is freed with everything recorded on it.
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

#: ``install(module, instrumentation) -> uninstall``
Installer = Callable[[nn.Module, "SharedInstrumentation"], Callable[[], None]]


class SharedInstrumentation:
    """Something installed on a shared module while any call uses it, routing each call to its own sink.

    Args:
        module: the module it is installed on (held weakly: the registry's values must not keep
            their keys alive).
        name: what is installed (used in the context variable's name).
        install: ``install(module, self) -> uninstall``: puts the instrumentation in place (it
            reads ``self.current()`` when it runs) and returns the function that takes it away.
            It must be a plain function of its arguments, not a closure over the module.
    """

    def __init__(self, module: nn.Module, name: str, install: Installer):
        self._module = weakref.ref(module)
        self._install = install
        self._sink: contextvars.ContextVar = contextvars.ContextVar(name, default=None)
        self._lock = threading.Lock()
        self._users = 0
        self._uninstall: Optional[Callable[[], None]] = None

    @property
    def installed(self) -> bool:
        """Whether the instrumentation is in place now (some call is recording)."""
        return self._uninstall is not None

    def current(self) -> Any:
        """The sink of the call running in this thread (or context), None outside any."""
        return self._sink.get()

    @contextlib.contextmanager
    def active(self, sink: Any) -> Iterator[Any]:
        """Within the block, this thread's calls of the module feed ``sink``."""
        with self._lock:
            if self._users == 0:
                module = self._module()
                if module is None:
                    raise RuntimeError("The module this instrumentation belongs to has been freed.")
                self._uninstall = self._install(module, self)
            self._users += 1
        try:
            token = self._sink.set(sink)
        except BaseException:
            self._release()
            raise
        try:
            yield sink
        finally:
            try:
                self._sink.reset(token)
            except ValueError:
                # The block is left in another context than it was entered in (a generator or task
                # resumed elsewhere): the variable cannot be reset from here, and the context that
                # set it is the one that sees it. The user count must still drop, or the module
                # would keep the instrumentation for good.
                pass
            finally:
                self._release()

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                uninstall, self._uninstall = self._uninstall, None
                if uninstall is not None:
                    uninstall()


def wrap_attention_processors(model: nn.Module, wrap: Callable[[str, Any], Any]) -> Callable[[], None]:
    """Replace every attention processor ``p`` of a diffusers ``model`` (its ``attn_processors``) by
    ``wrap(name, p)``, and return the undo: it puts the original back wherever one of these wrappers
    still sits, and keeps a processor that was set in the meantime (the user's ``set_attn_processor``)."""
    originals = dict(model.attn_processors)
    wrapped = {name: wrap(name, proc) for name, proc in originals.items()}
    # id -> wrapper: the wrappers stay referenced here, so their ids cannot be reused meanwhile.
    ours = {id(p): p for name, p in wrapped.items() if p is not originals[name]}
    model.set_attn_processor(dict(wrapped))  # diffusers empties the dict it is given

    def uninstall() -> None:
        current = model.attn_processors
        model.set_attn_processor({
            name: originals[name] if id(p) in ours and name in originals else p for name, p in current.items()
        })

    return uninstall


def shared_instrumentation(module: nn.Module, name: str, install: Installer) -> SharedInstrumentation:
    """The one ``SharedInstrumentation`` called ``name`` of ``module`` (made on first use)."""
    with _REGISTRY_LOCK:
        per_module = _REGISTRY.setdefault(module, {})
        if name not in per_module:
            per_module[name] = SharedInstrumentation(module, f"{name}@{id(module):x}", install)
        return per_module[name]
