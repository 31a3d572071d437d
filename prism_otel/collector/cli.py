"""``prism-otel collector --config FILE.yaml`` (also ``python -m prism_otel.collector``).

Exit status: 0 after a clean stop (SIGTERM / SIGINT), 2 for a config that does not load or
validate (the message names the YAML path), 1 when a component cannot start (e.g. a port in use;
nothing is left listening). ``--validate`` checks the config and exits. SIGUSR1 logs the counters (one JSON object).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Optional

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE.yaml", help="collector config (Collector YAML format)")
    p.add_argument("--validate", action="store_true", help="check the config and exit")


def register(sub) -> None:
    p = sub.add_parser("collector", help="run the prism collector: OTLP in, prism processors, OTLP out",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)


def dispatch(args) -> Optional[int]:
    if getattr(args, "cmd", None) != "collector":
        return None
    return run(args.config, validate_only=args.validate)


def run(path: str, validate_only: bool = False) -> int:
    from prism_otel.collector.config import load
    from prism_otel.collector.errors import ConfigError
    from prism_otel.collector.service import Service

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load(path)
    except ConfigError as exc:
        print(f"prism-otel collector: invalid config {path}: {exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(_LEVELS[cfg.telemetry.logs.level])
    if validate_only:
        print(f"prism-otel collector: {path} is valid")
        return 0
    service = Service(cfg)
    signal.signal(signal.SIGTERM, lambda *_: service.shutdown())
    signal.signal(signal.SIGINT, lambda *_: service.shutdown())
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda *_: logging.getLogger(__name__).info(
            "counters: %s", json.dumps(service.telemetry.snapshot(), sort_keys=True)))
    try:
        service.start()
    except ConfigError as exc:
        print(f"prism-otel collector: cannot start: {exc}", file=sys.stderr)
        return 1
    ports = []
    for rid, r in service.receivers.items():
        for proto, port in (("grpc", getattr(r, "grpc_port", None)), ("http", getattr(r, "http_port", None))):
            if port:
                ports.append(f"{rid}/{proto}={port}")
    print(f"prism-otel collector: ready ({' '.join(ports)})", flush=True)
    while not service.wait(0.5):
        pass
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m prism_otel.collector", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args.config, validate_only=args.validate)
