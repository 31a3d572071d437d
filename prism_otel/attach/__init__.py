"""Live attach and detach: start (and stop) prism-otel inside a running Python process.

``prism-otel attach PID`` runs :func:`prism_otel.start` in the target, ``detach`` runs
:func:`prism_otel.stop` (unwraps every hook, drains and flushes, stops our threads) and ``status``
asks the target what it has. The target's configuration (exporter, endpoint, service name,
options) comes from the attaching command's ``OTEL_*`` / ``PRISM_OTEL_*`` environment and flags,
carried in a request file; the target's own environment is neither needed nor changed.

How code gets into the target
-----------------------------
* **Python 3.14+**: ``sys.remote_exec`` (PEP 768). The interpreter runs our stub on its main thread
  at the next safe point; nothing is loaded, no ptrace-driven call. The caller must have the
  target's major.minor, so when ours differs the target's own interpreter makes the call.
* **Before 3.14**: pyinjector (kubo/injector) loads a 3 KB shim library of ours into the target and
  calls one function in it, ``prism_otel_trigger``, which only starts a native thread and returns.
  That thread takes the GIL the ordinary way (``PyGILState_Ensure``, as any C extension's callback
  thread does) and runs the stub. The target is stopped for the injection only (~1-5 ms here).

Why not the others (measured on this machine class, research/feasibility.md §4):

* **hypno 1.1.0** (the PyPI release) runs the injected code with ``PyRun_SimpleString`` *on the
  hijacked thread*, in the middle of whatever that thread was doing, holding the GIL or not; its
  authors moved master to ``Py_AddPendingCall`` after deadlocks (a non-reentrant lock held by the
  interrupted thread) and aborts on 3.14 (foreign C stack), and that fix is not released. Its
  template is also built per Python version (the wheel is cp311 only; 3.12 needs a compiler anyway).
  A pending call would wait for the *main* thread to reach bytecode, and an idle engine's main
  thread can block in a lock for as long as no request comes; a new thread waits only for the GIL.
* **gdb** works but is not a pip dependency, takes 0.35-0.5 s on a plain interpreter and 4.4 s on a
  process with torch loaded (it reads every library's symbols while the target is stopped), and
  runs the code on the thread it stopped, like hypno 1.1.0.
* **pyinjector** alone: manylinux wheels, maintained, 33-71 ms, but it only ``dlopen``s a library;
  hence the shim. The shim resolves every CPython symbol with ``dlsym`` at run time, so it needs no
  Python headers, serves every version, and does nothing in a process that is not Python. It is
  compiled once with the system C compiler (the one thing this path needs besides pyinjector).

The remaining hazard is the injector's own: ``dlopen`` runs on the stopped thread, so a thread
stopped inside ``malloc`` holding an arena lock could deadlock it (the same for gdb; only
``remote_exec`` avoids it). Nothing of ours runs there beyond ``pthread_create``.

What is refused before the target is touched (clear message, non-zero exit): no such process,
another user's process without ``CAP_SYS_PTRACE`` (or Yama says no), a non-Python process
(injecting into one kills it), Python < 3.9, 3.14+ with remote debugging disabled, a process in
another mount namespace, and a target that cannot import prism-otel (``--path`` adds a site-packages
directory, a wheel, or a directory of wheels to its ``sys.path`` for the bootstrap; detach removes them).

The handshake: the stub's thread writes ``status.json`` (``prism_otel.status()`` plus ``ok`` /
``error``) to a file the attacher chose, and the attacher waits for it; errors in the target
(e.g. an import failure) come back that way instead of only on the target's stderr.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ below hands out, for the type checker
    from prism_otel.attach.api import (
        AttachFailed,
        Refused,
        attach,
        attached,
        config_env,
        detach,
        examine,
        expand_paths,
        status,
        tree,
    )

__all__ = ["AttachFailed", "Refused", "attach", "attached", "config_env", "detach", "examine", "expand_paths",
           "status", "tree"]


def __getattr__(name: str):
    # Lazy: the target imports prism_otel.attach.agent, and with it this package; the attacher's
    # machinery (subprocess, fcntl, the injector) has no business being loaded there.
    if name in __all__:
        return getattr(importlib.import_module("prism_otel.attach.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
