"""The ``prism-otel`` command."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Optional

from prism_otel import semconv as sc


def _bootstrap_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap")


def run_command(argv: list[str]) -> int:
    """Run CMD with our bootstrap on PYTHONPATH (replaces this process, as opentelemetry-instrument does)."""
    if not argv:
        print(f"prism-otel run: missing command (usage: {RUN_USAGE})", file=sys.stderr)
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


RUN_USAGE = "prism-otel run [--] CMD [ARGS...]"
RUN_HELP = f"""usage: {RUN_USAGE}

Run CMD with prism-otel loaded in every Python process it starts (our bootstrap goes on PYTHONPATH and
the command replaces this process, as opentelemetry-instrument does). Options after CMD are CMD's own.

With no exporter configured, spans go to ./prism-out (PRISM_OTEL_OUT_DIR) and a per-stage summary is
printed at exit; OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT send them over OTLP instead, and
OTEL_METRICS_EXPORTER=prometheus|otlp turns the metrics on. Incidents are printed as they open and close
(PRISM_OTEL_ALERTMANAGER_URL, PRISM_OTEL_ALERT_WEBHOOK deliver them too). docs/configuration.md lists
every variable.

example: prism-otel run -- python -m vllm.entrypoints.openai.api_server --model ...
"""


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        rest = argv[1:]
        if rest and rest[0] in ("-h", "--help"):  # `run --help` is ours; `run -- CMD --help` is CMD's
            print(RUN_HELP, end="")
            return 0
        if rest and rest[0] == "--":
            rest = rest[1:]
        return run_command(rest)
    from prism_otel import __version__

    parser = argparse.ArgumentParser(prog="prism-otel", description=__doc__)
    parser.add_argument("--version", action="version", version=f"prism-otel {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help=f"run a command with prism-otel loaded in every Python process: {RUN_USAGE}",
                   usage=RUN_USAGE)
    from prism_otel import cli_ext

    cli_ext.register(sub)
    args = parser.parse_args(argv)
    return cli_ext.dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
