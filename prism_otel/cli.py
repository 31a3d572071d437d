"""The ``prism-otel`` command."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import List, Optional

from prism_otel import semconv as sc


def _bootstrap_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap")


def run_command(argv: List[str]) -> int:
    """Run CMD with our bootstrap on PYTHONPATH (replaces this process, as opentelemetry-instrument does)."""
    if not argv:
        print("prism-otel run: missing command (usage: prism-otel run -- CMD ARGS...)", file=sys.stderr)
        return 2
    exe = shutil.which(argv[0])
    if exe is None:
        print(f"prism-otel run: command not found: {argv[0]}", file=sys.stderr)
        return 127
    boot = _bootstrap_dir()
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != boot]
    os.environ["PYTHONPATH"] = os.pathsep.join([boot] + parts)
    os.environ[sc.ENV_BOOTSTRAP_ACTIVE] = "1"
    os.execv(exe, argv)
    return 0  # not reached


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        rest = argv[1:]
        if rest and rest[0] == "--":
            rest = rest[1:]
        return run_command(rest)
    parser = argparse.ArgumentParser(prog="prism-otel", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="run a command with prism-otel loaded in every Python process: run -- CMD ARGS")
    from prism_otel import cli_ext

    cli_ext.register(sub)
    args = parser.parse_args(argv)
    return cli_ext.dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
