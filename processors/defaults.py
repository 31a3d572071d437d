"""The processors that run on every step by default (in the companion, or an in-process pipeline): detection and SLO.

Configured from the environment (names in :mod:`prism_otel.semconv`):

* ``PRISM_OTEL_BASELINE_DIR``: persist and load learned baselines there (none: no persistence);
* ``PRISM_OTEL_BASELINE_KEY``: ``model=...,hardware=...,framework=...,parallelism=...,versions=...``
  overrides of the key a baseline is stored under; fields left out are detected (framework and its
  version, torch version, device or CPU name, ``WORLD_SIZE``; the model name from the runtime once the
  engine reported it);
* ``PRISM_OTEL_ALERT_FILE`` (``stderr``, a path, or ``none``), ``PRISM_OTEL_ALERT_WEBHOOK``;
* ``PRISM_OTEL_DETECT_CONFIG``: ``key=value,...`` overrides of any other detector key
  (processors/README.md lists them);
* ``PRISM_OTEL_SLO_TTFT_MS``, ``PRISM_OTEL_SLO_TPOT_MS``, ``PRISM_OTEL_SLO_STEP_MS``,
  ``PRISM_OTEL_SLO_OBJECTIVE``, ``PRISM_OTEL_SLO_WINDOW_S``: the SLO processor runs when a target is set.

A bad value raises ``ValueError`` naming the variable; the runtime logs it and starts without detection.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Callable, Dict, Optional

from prism_otel import semconv as sc


def _pairs(var: str) -> Dict[str, str]:
    text = os.environ.get(var, "").strip()
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"{var}: expected key=value pairs separated by commas, got {part!r}")
        out[k.strip()] = v.strip()
    return out


_HW: Dict[str, str] = {}


def _hardware() -> str:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():  # never initialise a device just to name it
            return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    except Exception:  # noqa: BLE001
        pass
    if "cpu" in _HW:  # /proc/cpuinfo is read once
        return _HW["cpu"]
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    _HW["cpu"] = line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
                    return _HW["cpu"]
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} x{os.cpu_count()}".strip()


def _framework() -> tuple:
    for name in ("vllm", "sglang", "transformers"):
        mod = sys.modules.get(name)
        if mod is not None:
            return name, str(getattr(mod, "__version__", ""))
    return "", ""


def detected_key() -> Dict[str, str]:
    fw, ver = _framework()
    torch = sys.modules.get("torch")
    versions = ";".join(v for v in (f"{fw}={ver}" if fw else "",
                                    f"torch={getattr(torch, '__version__', '')}" if torch else "") if v)
    return {"hardware": _hardware(), "framework": fw, "versions": versions,
            "parallelism": f"world={os.environ.get('WORLD_SIZE', '1')}"}




def anomaly_config_from_env() -> dict:
    cfg: Dict[str, object] = dict(_pairs(sc.ENV_DETECT_CONFIG))
    if os.environ.get(sc.ENV_BASELINE_DIR):
        cfg["baseline_dir"] = os.environ[sc.ENV_BASELINE_DIR]
    # the detector's own per-step alerts are off: incidents (processors.incidents) are what notifies, and
    # PRISM_OTEL_ALERT_FILE / PRISM_OTEL_ALERT_WEBHOOK configure their delivery
    cfg.setdefault("alert_file", "none")
    cfg.setdefault("alert_log", False)
    return cfg


def slo_config_from_env() -> Optional[dict]:
    names = {"ttft_ms": sc.ENV_SLO_TTFT_MS, "tpot_ms": sc.ENV_SLO_TPOT_MS, "step_ms": sc.ENV_SLO_STEP_MS,
             "objective": sc.ENV_SLO_OBJECTIVE, "window_s": sc.ENV_SLO_WINDOW_S}
    cfg = {k: os.environ[v] for k, v in names.items() if os.environ.get(v)}
    if not any(k in cfg for k in ("ttft_ms", "tpot_ms", "step_ms")):
        return None
    return cfg


def in_process_processors(model_name: Optional[Callable[[], Optional[str]]] = None) -> list:
    """Detection and SLO as the environment configures them. ``model_name``: asked for the served
    model's name (the engine reports it late), part of the baseline key."""
    from processors.anomaly import AnomalyConfig, AnomalyProcessor
    from processors.slo import SLOConfig, SLOProcessor

    try:
        # in an engine process every fit goes to a worker process, the first one too (its steps wait
        # unjudged until it comes back): nothing is fitted on the engine's interpreter. A companion has no
        # engine to protect: it fits its first model inline and judges every later step
        in_engine = os.environ.get(sc.ENV_ROLE) != sc.ROLE_COMPANION
        acfg = AnomalyConfig.from_dict({"fit_process": in_engine, "fit_inline": not in_engine,
                                        **anomaly_config_from_env()})
    except ValueError as exc:
        raise ValueError(f"{sc.ENV_DETECT_CONFIG} (or {sc.ENV_BASELINE_DIR}, {sc.ENV_ALERT_FILE}, "
                         f"{sc.ENV_ALERT_WEBHOOK}): {exc}") from None
    override = _pairs(sc.ENV_BASELINE_KEY)
    from processors.baseline import normalize_key

    try:
        normalize_key(override)
    except ValueError as exc:
        raise ValueError(f"{sc.ENV_BASELINE_KEY}: {exc}") from None

    def resolve() -> Optional[dict]:
        name = override.get("model") or (model_name() if model_name is not None else None)
        if not name:
            return None  # asked again on the next step (the engine names its model late)
        key = {**detected_key(), **override}
        if not key.get("model"):
            key["model"] = name
        return key

    procs: list = [AnomalyProcessor(acfg, key_resolver=resolve)]
    scfg = slo_config_from_env()
    if scfg is not None:
        try:
            procs.append(SLOProcessor(SLOConfig.from_dict(scfg)))
        except ValueError as exc:
            raise ValueError(f"PRISM_OTEL_SLO_*: {exc}") from None
    return procs + reporting_processors()


def reporting_processors() -> list:
    """What runs after detection: incidents (grouped anomalous steps, delivered) and metrics."""
    from processors.incidents import IncidentConfig, IncidentProcessor, incident_config_from_env
    from prism_otel import metrics

    try:
        icfg = IncidentConfig.from_dict(incident_config_from_env())
    except ValueError as exc:
        raise ValueError(f"{sc.ENV_INCIDENT_CONFIG} (or {sc.ENV_ALERT_FILE}, {sc.ENV_ALERT_WEBHOOK}, "
                         f"{sc.ENV_ALERTMANAGER_URL}): {exc}") from None
    inc = IncidentProcessor(icfg, service=metrics.service_name())
    out: list = [inc]
    m = metrics.metrics_processor()
    if m is not None:
        inc.on_event = m.on_incident
        out.append(m)
    return out
