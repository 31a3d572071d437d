"""``prism-otel attach PID``, ``prism-otel detach PID``, ``prism-otel status [PID]``.

Exit codes: 0 done; 1 the target was reached but the request failed (the message and the target's
report say why); 2 refused before touching the target (not Python, no permission, cannot import
prism-otel, ...); with ``--tree``, the worst over the processes attached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from prism_otel import semconv as sc

RC_OK, RC_FAILED, RC_REFUSED = 0, 1, 2


def register(sub) -> None:
    a = sub.add_parser("attach", help="start prism-otel inside a running Python process (no restart)",
                       description="Start prism-otel inside running process PID. Exporter, endpoint, service "
                       "name and options come from this command's OTEL_* / PRISM_OTEL_* environment and flags.")
    a.add_argument("pid", type=int)
    a.add_argument("--tree", action="store_true",
                   help="also every descendant that is Python with an engine loaded (vLLM API server, EngineCore, "
                   "workers)")
    a.add_argument("--path", action="append", default=[], metavar="DIR",
                   help="site-packages directory, wheel, or directory of wheels to add to the target's sys.path "
                   "for the bootstrap (repeatable; removed again at detach)")
    a.add_argument("--timeout", type=float, default=None, metavar="S",
                   help=f"seconds to wait for the target's handshake (default ${sc.ENV_ATTACH_TIMEOUT} or 30)")
    a.add_argument("--endpoint", help=f"sets {sc.OTEL_EXPORTER_OTLP_ENDPOINT} for the target")
    a.add_argument("--exporter", help=f"sets {sc.OTEL_TRACES_EXPORTER} for the target (otlp, console, none, ...)")
    a.add_argument("--service-name", help=f"sets {sc.OTEL_SERVICE_NAME} for the target")
    a.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any other OTEL_* / PRISM_OTEL_* variable for the target (repeatable)")
    a.add_argument("--no-probe", action="store_true",
                   help="skip the import check (the handshake still reports an import failure)")
    a.add_argument("--json", action="store_true", help="print the handshake documents as JSON")
    a.add_argument("--follow", "-f", action="store_true",
                   help="then print the target's incidents here as they open and close, until it exits or Ctrl-C "
                   "(`prism-otel alerts --pid PID --follow`)")
    d = sub.add_parser("detach", help="stop prism-otel in a process it was attached to, leaving it as it was")
    d.add_argument("pid", type=int)
    d.add_argument("--tree", action="store_true", help="also every descendant with an engine loaded")
    d.add_argument("--timeout", type=float, default=None, metavar="S")
    d.add_argument("--json", action="store_true")
    s = sub.add_parser("status", help="with PID: ask that process what prism-otel does there; without: this "
                       "process and the processes this user attached to")
    s.add_argument("pid", type=int, nargs="?")
    s.add_argument("--timeout", type=float, default=None, metavar="S")
    s.add_argument("--json", action="store_true")


def _overrides(args) -> dict:
    out = {}
    for item in args.set:
        k, sep, v = item.partition("=")
        if not sep or not k.startswith((sc.OTEL_ENV_PREFIX, sc.ENV_PREFIX)):
            raise SystemExit(f"prism-otel attach: --set {item!r}: expected OTEL_*=VALUE or PRISM_OTEL_*=VALUE")
        out[k] = v
    for flag, name in ((args.endpoint, sc.OTEL_EXPORTER_OTLP_ENDPOINT), (args.exporter, sc.OTEL_TRACES_EXPORTER),
                       (args.service_name, sc.OTEL_SERVICE_NAME)):
        if flag:
            out[name] = flag
    return out


def _summary(doc: dict) -> str:
    insts = ", ".join(f"{k}={v[0]}" for k, v in sorted(doc.get("instrumentations", {}).items()) if "." not in k)
    parts = [f"pid {doc.get('pid')}", f"python {doc.get('python', '?')}",
             "running" if doc.get("running") else "not running"]
    if doc.get("already"):
        parts.append("already attached")
    if insts:
        parts.append(insts)
    if doc.get("patched"):
        parts.append(f"{len(doc['patched'])} hooks")
    if "steps" in doc:
        parts.append(f"{doc['steps']} steps")
    if doc.get("handshake_ms") is not None:
        parts.append(f"handshake {doc['handshake_ms']:.0f} ms via {doc.get('method')}")
    if not doc.get("loaded", True):
        parts.append("prism-otel not loaded")
    return ", ".join(parts)


def _targets(pid: int, with_tree: bool):
    from prism_otel.attach import examine, tree

    if not with_tree:
        return [examine(pid)], []
    return tree(pid)


def _run_each(args, action: str) -> int:
    from prism_otel import attach as at

    follow = action == "attach" and getattr(args, "follow", False)
    try:
        over = _overrides(args) if action == "attach" else {}
        if follow and sc.ENV_INCIDENT_DIR not in over and not os.environ.get(sc.ENV_INCIDENT_DIR):
            from processors.notify import runtime_incident_dir

            over[sc.ENV_INCIDENT_DIR] = runtime_incident_dir()  # where this terminal follows them
        env = at.config_env(over) if action == "attach" else None
        targets, skipped = _targets(args.pid, args.tree)
    except at.Refused as exc:
        print(f"prism-otel {action}: refused: {exc}", file=sys.stderr)
        return RC_REFUSED
    for pid, why in skipped:
        print(f"prism-otel {action}: skipping {pid}: {why}", file=sys.stderr)
    rc, docs = RC_OK, []
    for t in targets:
        try:
            if action == "attach":
                doc = at.attach(t.pid, env=env, paths=args.path, timeout=args.timeout,
                                probe=not args.no_probe, target=t)
            else:
                doc = at.detach(t.pid, timeout=args.timeout, target=t)
        except at.Refused as exc:
            print(f"prism-otel {action}: refused {t.pid}: {exc}", file=sys.stderr)
            rc = max(rc, RC_REFUSED)
            continue
        except at.AttachFailed as exc:
            print(f"prism-otel {action}: {exc}", file=sys.stderr)
            if exc.doc.get("traceback"):
                print(exc.doc["traceback"], file=sys.stderr)
            docs.append(exc.doc)
            rc = max(rc, RC_FAILED)
            continue
        docs.append(doc)
        if not args.json:
            verb = "attached" if action == "attach" else "detached"
            print(f"{verb}: {_summary(doc)}")
    if args.json:
        print(json.dumps(docs, indent=1, default=repr))
    if follow and rc == RC_OK and targets and env is not None:  # (env is set whenever follow is)
        from prism_otel import alerts_cli

        pids = [t.pid for t in targets]
        dirs = alerts_cli.search_dirs([env.get(sc.ENV_INCIDENT_DIR) or over[sc.ENV_INCIDENT_DIR]])
        print(f"following incidents of {', '.join(map(str, pids))} (Ctrl-C to stop)", flush=True)
        try:
            alerts_cli.follow(pids, dirs, True)
        except KeyboardInterrupt:
            pass
    return rc


def _status(args) -> int:
    from prism_otel import attach as at

    if args.pid is None:
        import prism_otel

        here = prism_otel.status()
        here.setdefault("python", sys.version.split()[0])
        procs = at.attached()
        if args.json:
            print(json.dumps({"self": here, "attached": procs}, indent=1, default=repr))
            return RC_OK
        print(f"this process: {_summary(here)}")
        if not procs:
            print("attached processes: none")
        for e in procs:
            print(f"attached: pid {e['pid']} python {e['python']} engine {e.get('engine') or '-'} "
                  f"{len(e.get('patched', []))} hooks: {' '.join(e.get('argv', []))[:100]}")
        return RC_OK
    try:
        doc = at.status(args.pid, timeout=args.timeout)
    except at.Refused as exc:
        print(f"prism-otel status: refused: {exc}", file=sys.stderr)
        return RC_REFUSED
    except at.AttachFailed as exc:
        print(f"prism-otel status: {exc}", file=sys.stderr)
        return RC_FAILED
    print(json.dumps(doc, indent=1, default=repr) if args.json else _summary(doc))
    return RC_OK if doc.get("ok") else RC_FAILED


def dispatch(args):
    cmd = getattr(args, "cmd", None)
    if cmd in ("attach", "detach"):
        return _run_each(args, cmd)
    if cmd == "status":
        return _status(args)
    return None


def main(argv: list[str]) -> Optional[int]:  # for `python -m prism_otel.attach.cli` in tests
    p = argparse.ArgumentParser(prog="prism-otel")
    register(p.add_subparsers(dest="cmd", required=True))
    return dispatch(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
