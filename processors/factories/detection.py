"""``prism_anomaly``: workload-aware detection (:class:`processors.anomaly.AnomalyProcessor`).

In-process (environment names in :mod:`prism_otel.semconv`): ``PRISM_OTEL_DETECT_CONFIG``
(``key=value,...`` overrides of any detector key, processors/README.md), ``PRISM_OTEL_BASELINE_DIR``
(persist and load learned baselines there), ``PRISM_OTEL_BASELINE_KEY``
(``model=...,hardware=...,framework=...,parallelism=...,versions=...`` overrides of the key a baseline is
stored under; fields left out are detected: framework and its version, torch version, device or CPU
name, ``WORLD_SIZE``; the model name from the runtime once the engine reported it). The detector's own
per-step alerts are off there: incidents (``prism_incidents``) are what notifies.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, Optional

from prism_otel import engines
from prism_otel import semconv as sc
from prism_otel.config_error import ConfigError
from processors.anomaly_config import AnomalyConfig
from processors.config import env_pairs
from processors.factory import ORDER_DETECT, Context, ProcessorFactory

_HW: dict[str, str] = {}


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


def _framework() -> tuple[str, str]:
    for e in engines.known():
        mod = sys.modules.get(e.module)
        if mod is not None:
            return e.name, str(getattr(mod, "__version__", ""))
    return "", ""


def detected_key() -> dict[str, str]:
    fw, ver = _framework()
    torch = sys.modules.get("torch")
    versions = ";".join(v for v in (f"{fw}={ver}" if fw else "",
                                    f"torch={getattr(torch, '__version__', '')}" if torch else "") if v)
    return {"hardware": _hardware(), "framework": fw, "versions": versions,
            "parallelism": f"world={os.environ.get('WORLD_SIZE', '1')}"}


def _key_override() -> dict[str, str]:
    """``PRISM_OTEL_BASELINE_KEY``, checked (a ``ConfigError`` naming the variable)."""
    from processors.baseline import normalize_key

    override = env_pairs(sc.ENV_BASELINE_KEY)
    try:
        normalize_key(override)
    except ValueError as exc:
        raise ConfigError(sc.ENV_BASELINE_KEY, str(exc)) from None
    return override


def from_env(context: Context) -> dict[str, Any]:
    # in an engine process every fit goes to a worker process, the first one too (its steps wait
    # unjudged until it comes back): nothing is fitted on the engine's interpreter. A companion has no
    # engine to protect: it fits its first model inline and judges every later step
    in_engine = context.role != sc.ROLE_COMPANION
    cfg: dict[str, Any] = {"fit_process": in_engine, "fit_inline": not in_engine, **env_pairs(sc.ENV_DETECT_CONFIG)}
    if os.environ.get(sc.ENV_BASELINE_DIR):
        cfg["baseline_dir"] = os.environ[sc.ENV_BASELINE_DIR]
    # the detector's own per-step alerts are off: incidents (processors.incidents) are what notifies, and
    # PRISM_OTEL_ALERT_FILE / PRISM_OTEL_ALERT_WEBHOOK configure their delivery
    cfg.setdefault("alert_file", "none")
    cfg.setdefault("alert_log", False)
    _key_override()
    return cfg


def create(config: AnomalyConfig, context: Context) -> Any:
    from processors.anomaly import AnomalyProcessor  # lazy: the detector (numpy, its model) loads where configured

    if not context.in_process:
        return AnomalyProcessor(config)  # the collector: the key comes with each instance's resource
    override = _key_override()
    model_name = context.model_name

    def resolve() -> Optional[dict]:
        name = override.get("model") or (model_name() if model_name is not None else None)
        if not name:
            return None  # asked again on the next step (the engine names its model late)
        key = {**detected_key(), **override}
        if not key.get("model"):
            key["model"] = name
        return key

    return AnomalyProcessor(config, key_resolver=resolve)


factory = ProcessorFactory(
    "prism_anomaly", AnomalyConfig, create, from_env=from_env, order=ORDER_DETECT, needs_detection=True,
    env=f"{sc.ENV_DETECT_CONFIG} (or {sc.ENV_BASELINE_DIR}, {sc.ENV_ALERT_FILE}, {sc.ENV_ALERT_WEBHOOK})")
