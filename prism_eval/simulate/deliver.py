"""Run a function of ours inside a running engine, through live attach's own mechanism.

In-process faults (``stage_stall``, ``gc_storm``) must act inside the engine's interpreter, without
editing the engine or restarting it. They travel exactly as ``prism-otel attach`` does
(:mod:`prism_otel.attach`): the same ``/proc`` preflight refusals, the same injection (pyinjector +
shim before Python 3.14, ``sys.remote_exec`` after), the same stub, request file and handshake; the
request's action is ``call`` and names a ``prism_otel.*`` function, which the agent runs in the
target and whose return value comes back in the handshake.

The target must already have prism-otel loaded (it runs under ``prism-otel run`` or was attached):
the stub does not load prism-otel for anything but ``attach``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from prism_otel.attach._inject import InjectError, Request

try:  # the attacher's side of prism_otel.attach (moved to .api by its owner; either layout works)
    from prism_otel.attach import api as _attach
except ImportError:  # pragma: no cover - older layout
    import prism_otel.attach as _attach


class DeliveryFailed(RuntimeError):
    """The call did not run in the target (or failed there); the message says why."""


def call(pid: int, target: str, kwargs: Optional[dict] = None, timeout: Optional[float] = None) -> Any:
    """Run ``target`` (``"prism_eval.<module>:<function>"``) with ``kwargs`` inside process ``pid``;
    returns what it returned (a dict gets ``_delivery_ms`` added). Raises :class:`DeliveryFailed`
    (with the refusal or the target's error)."""
    try:
        t = _attach.examine(pid)
    except _attach.Refused as exc:
        raise DeliveryFailed(f"refused: {exc}") from exc
    wait_s = _attach.default_timeout() if timeout is None else timeout
    with _attach._locked(f"lock-{t.pid}"):
        req = Request(t, "call", {}, ())
        answered = False
        try:
            with open(req.request_path) as f:
                doc = json.load(f)
            doc["call"] = {"target": target, "kwargs": kwargs or {}}
            fd = os.open(req.request_path, os.O_WRONLY | os.O_TRUNC)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            t0 = time.perf_counter()
            try:
                req.trigger()
            except (InjectError, _attach.Refused) as exc:
                raise DeliveryFailed(str(exc)) from exc
            doc = req.wait(wait_s)
            answered = doc is not None
            if doc is None:
                raise DeliveryFailed(f"no answer from process {pid} within {wait_s:g} s ({req.method})")
        except _attach.AttachFailed as exc:
            raise DeliveryFailed(str(exc)) from exc
        finally:
            req.cleanup(answered)
    if not doc.get("loaded", False) and "result" not in doc:
        raise DeliveryFailed(f"process {pid} has no prism-otel loaded: run the engine under `prism-otel run` "
                             f"or `prism-otel attach {pid}` first")
    if not doc.get("ok"):
        raise DeliveryFailed(f"{target} failed in process {pid}: {doc.get('error')}\n{doc.get('traceback', '')}")
    res = doc.get("result")
    if isinstance(res, dict):
        res = dict(res, _delivery_ms=round((time.perf_counter() - t0) * 1e3, 1))
    return res
