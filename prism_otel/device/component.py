"""``prism_device``: DeepDive triggers and device health on each step (:class:`prism_otel.device.processor.DeviceProcessor`),
after the verdicts; in-process only. In the companion it triggers the engine's DeepDive through the ring
(the context's ``deepdive``); in an engine's own pipeline it is left out when DeepDive and device health
sampling (``PRISM_OTEL_DEVICE_HEALTH=0``) are both off."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from prism_otel import semconv as sc
from prism_otel.device.deepdive import DEEPDIVE
from prism_otel.device.processor import DeviceProcessor
from processors.factory import ORDER_DEVICE, Context, ProcessorFactory


@dataclass
class DeviceConfig:
    """No keys: DeepDive and device health have their own variables (docs/device.md)."""


def from_env(context: Context) -> Optional[dict[str, Any]]:
    if context.deepdive is None and not DEEPDIVE.enabled and os.environ.get(sc.ENV_DEVICE_HEALTH, "1") == "0":
        return None
    return {}


def create(config: DeviceConfig, context: Context) -> DeviceProcessor:
    if context.deepdive is not None:
        return DeviceProcessor(deepdive=context.deepdive)
    DEEPDIVE.install_signal()
    return DeviceProcessor()


factory = ProcessorFactory("prism_device", DeviceConfig, create, from_env=from_env, order=ORDER_DEVICE,
                           collector=False)
