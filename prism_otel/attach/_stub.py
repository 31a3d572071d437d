"""The code injected into the target: it only starts a thread, and that thread does the rest.

The stub runs where the injector puts it: on the target's main thread at its next bytecode
boundary (``sys.remote_exec``, 3.14+) or on a fresh native thread that took the GIL (our pyinjector
shim, before 3.14). Either way it defines one function, starts the ``prism-otel-attach`` daemon
thread, and deletes its name again, so the ``__main__`` namespace it ran in is left as it was.
The thread reads the request (a JSON file that only the target's user can read, deleted once
read since it may hold exporter credentials), adds ``--path`` entries to ``sys.path``, shows the
request's ``OTEL_*`` / ``PRISM_OTEL_*`` variables in place of the target's own (``os.environ``'s
mapping only, no ``putenv``; restored afterwards), imports :mod:`prism_otel.attach.agent` and lets
it act; if the import fails it still writes the handshake file, so the attacher learns why instead
of timing out (an injector's own rc proves nothing). A ``status`` or ``detach`` request to a
process where prism-otel was never loaded imports nothing.
"""

from __future__ import annotations

_TEMPLATE = r'''
def _prism_otel_attach_stub(request_path=%(request)r):
    import threading

    def run():
        import json
        import os
        import sys
        try:
            with open(request_path) as f:
                req = json.load(f)
        except Exception:
            return
        try:
            os.unlink(request_path)
        except OSError:
            pass

        def report(doc):
            try:
                tmp = req["status_path"] + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(doc, f, default=repr)
                os.replace(tmp, req["status_path"])
            except Exception:
                pass

        base = {"id": req["id"], "action": req["action"], "pid": os.getpid(),
                "python": sys.version.split()[0], "executable": sys.executable}
        prefixes = tuple(req.get("env_prefixes", ("OTEL_", "PRISM_OTEL_")))
        env = os.environ
        data, ek, ev, dk = (getattr(env, n, None) for n in ("_data", "encodekey", "encodevalue", "decodekey"))
        if None in (data, ek, ev, dk):  # not CPython's os._Environ: fall back to the public mapping
            data, ek, ev, dk = env, str, str, str

        def swap(values):
            old = {k: v for k, v in data.items() if dk(k).startswith(prefixes)}
            for k in old:
                del data[k]
            data.update(values)
            return old

        doc = None
        try:
            if req["action"] != "attach" and "prism_otel" not in sys.modules:
                doc = dict(base, ok=True, loaded=False, running=False)
                return
            added = [p for p in req.get("paths", []) if p not in sys.path]
            sys.path[0:0] = added
            saved = swap({ek(k): ev(v) for k, v in req.get("env", {}).items()})
            try:
                from prism_otel.attach import agent
                doc = agent.run(req, added, base)
            except BaseException as exc:
                for p in added:
                    if p in sys.path:
                        sys.path.remove(p)
                doc = dict(base, ok=False, loaded="prism_otel" in sys.modules, running=False, sys_path=sys.path,
                           error="cannot import prism_otel in the target: %%r" %% (exc,))
            finally:
                swap(saved)
            doc["target_env"] = sorted(dk(k) for k in data if dk(k).startswith(prefixes))
        except BaseException as exc:
            doc = dict(base, ok=False, error="attach bootstrap failed: %%r" %% (exc,))
        finally:
            if doc is not None:
                report(doc)

    threading.Thread(target=run, name="prism-otel-attach", daemon=True).start()


_prism_otel_attach_stub()
del _prism_otel_attach_stub
'''


def render(request_path: str) -> str:
    """The stub for one request file (a path inside the target's filesystem view)."""
    return _TEMPLATE % {"request": request_path}
