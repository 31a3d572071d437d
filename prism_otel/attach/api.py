"""The attacher's side of live attach (the package docstring says how and why): checks, requests,
handshakes, the registry of attached processes. Never imported in the target."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.attach._inject import InjectError, Request, work_dir
from prism_otel.attach._target import Refused, Target, examine, probe_imports, start_time, tree  # noqa: F401

__all__ = ["AttachFailed", "Refused", "attach", "attached", "config_env", "detach", "examine", "expand_paths",
           "status", "tree"]

DEFAULT_TIMEOUT = 30.0


class AttachFailed(Exception):
    """The request reached the target (or tried to) but did not succeed; ``doc`` is the handshake."""

    def __init__(self, msg: str, doc: Optional[dict] = None) -> None:
        super().__init__(msg)
        self.doc = doc or {}


def default_timeout() -> float:
    try:
        return float(os.environ.get(sc.ENV_ATTACH_TIMEOUT, DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


def config_env(overrides: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The configuration the target gets: our OTEL_* / PRISM_OTEL_* variables plus ``overrides``.
    With no exporter configured, the embedded default writes under the *attacher's* ./prism-out."""
    attacher_only = {sc.ENV_ATTACH_DIR, sc.ENV_ATTACH_TIMEOUT}
    env = {k: v for k, v in os.environ.items()
           if k.startswith((sc.OTEL_ENV_PREFIX, sc.ENV_PREFIX)) and k not in attacher_only}
    env.update(overrides or {})
    if not any(env.get(k) for k in (sc.OTEL_TRACES_EXPORTER, sc.OTEL_EXPORTER_OTLP_ENDPOINT,
                                    sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, sc.ENV_OUT_DIR)):
        env[sc.ENV_OUT_DIR] = os.path.abspath("prism-out")
    return env


def expand_paths(paths: Sequence[str]) -> list[str]:
    """``--path`` entries as sys.path entries: a directory as is, plus every wheel inside it."""
    out: list[str] = []
    for p in paths:
        p = os.path.abspath(p)
        if not os.path.exists(p):
            raise Refused(f"--path {p}: no such file or directory")
        out.append(p)
        if os.path.isdir(p):
            out.extend(os.path.join(p, n) for n in sorted(os.listdir(p))
                       if n.endswith(".whl") and len(n) > 4 and os.path.isfile(os.path.join(p, n)))
    return out


@contextmanager
def _locked(name: str):
    fd = os.open(os.path.join(work_dir(), name), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _registry_path() -> str:
    return os.path.join(work_dir(), "attached.json")


def _registry() -> dict[str, dict]:
    try:
        with open(_registry_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _remember(t: Target, doc: dict, attached_now: bool) -> None:
    with _locked("registry.lock"):
        reg = _registry()
        if attached_now:
            reg[str(t.pid)] = {"pid": t.pid, "start_time": t.start_time, "attached_at": time.time(),
                               "python": t.version_str, "engine": t.engine, "exe": t.exe,
                               "patched": doc.get("patched", []), "argv": t.argv[:8]}
        else:
            reg.pop(str(t.pid), None)
        for k, e in list(reg.items()):  # forget processes that are gone (or whose pid was reused)
            try:
                alive = start_time(e["pid"]) == e["start_time"]
            except (OSError, ValueError, KeyError):
                alive = False
            if not alive:
                reg.pop(k)
        tmp = _registry_path() + ".tmp"
        with open(tmp, "w") as f:
            json.dump(reg, f, indent=1)
        os.replace(tmp, _registry_path())


def attached() -> list[dict]:
    """Processes this user attached to that are still alive (the same process: pid + start time)."""
    out = []
    for e in _registry().values():
        try:
            if start_time(e["pid"]) == e["start_time"]:
                out.append(e)
        except (OSError, ValueError, KeyError):
            continue
    return sorted(out, key=lambda e: e["pid"])


def _request(t: Target, action: str, env: dict[str, str], paths: Sequence[str], timeout: float) -> dict:
    with _locked(f"lock-{t.pid}"):
        req = Request(t, action, env, paths, stop_timeout=max(1.0, timeout / 2))
        answered = False
        try:
            t0 = time.perf_counter()
            try:
                req.trigger()
            except InjectError as exc:
                answered = True  # nothing will run: remove the request (it may hold credentials)
                raise AttachFailed(str(exc)) from exc
            except BaseException:
                answered = True
                raise
            doc = req.wait(timeout)
            answered = doc is not None
            if doc is None:
                raise AttachFailed(
                    f"no handshake from process {t.pid} within {timeout:g} s after {req.method} succeeded: "
                    f"the bootstrap may still be starting, or failed before it could report (see the "
                    f"target's stderr); "
                    f"`prism-otel status {t.pid}` asks again")
            doc["method"] = req.method
            doc["inject_ms"] = round((req.inject_s or 0) * 1e3, 2)
            doc["handshake_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
            return doc
        finally:
            req.cleanup(answered)


def _check_import(t: Target, paths: Sequence[str]) -> None:
    rep = probe_imports(t, paths)
    t.probe = rep
    missing = rep.get("missing") or {}
    if missing:
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        raise Refused(
            f"process {t.pid} (Python {rep.get('python', t.version_str)}, {rep.get('interpreter', t.exe)}) "
            f"cannot import {', '.join(sorted(missing))}: pass --path DIR with a site-packages directory, a wheel "
            f"or a directory of wheels built for that Python (e.g. `pip install --target DIR prism-otel` with "
            f"that interpreter; this prism-otel lives in {here})"
            + (f". The probe ran as the target's user (uid {t.uid}): the directories must be readable by it"
               if t.uid != os.geteuid() else ""))


def attach(pid: int, env: Optional[dict[str, str]] = None, paths: Sequence[str] = (),
           timeout: Optional[float] = None, probe: bool = True, target: Optional[Target] = None) -> dict:
    """Start prism-otel in ``pid``; returns its handshake. Raises :class:`Refused` (untouched) or
    :class:`AttachFailed`. Attaching to an attached process is harmless (``already`` is true)."""
    t = target or examine(pid)
    paths = expand_paths(paths)
    if probe:
        _check_import(t, paths)
    doc = _request(t, "attach", config_env() if env is None else env, paths,
                   default_timeout() if timeout is None else timeout)
    if not doc.get("ok") or not doc.get("running"):
        raise AttachFailed(f"attach to {t.pid} failed in the target: {doc.get('error', 'not running')}", doc)
    _remember(t, doc, True)
    return doc


def detach(pid: int, timeout: Optional[float] = None, target: Optional[Target] = None) -> dict:
    """Stop prism-otel in ``pid`` (unwrap, flush, stop threads, drop the --path entries)."""
    t = target or examine(pid)
    doc = _request(t, "detach", config_env(), (), default_timeout() if timeout is None else timeout)
    _remember(t, doc, False)
    if not doc.get("ok") or doc.get("running"):
        raise AttachFailed(f"detach from {t.pid} failed in the target: {doc.get('error', 'still running')}", doc)
    return doc


def status(pid: int, timeout: Optional[float] = None) -> dict:
    """Ask ``pid`` what prism-otel is doing there (loads nothing into a process that has none)."""
    t = examine(pid)
    return _request(t, "status", {}, (), default_timeout() if timeout is None else timeout)
