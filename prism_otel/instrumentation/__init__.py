"""Engine instrumentations. Each is an OTel ``BaseInstrumentor`` whose wrappers only write to the
hot-path :class:`~prism_otel.record.Recorder`; none imports its engine at module level (hooks are
installed when the engine's module is imported, through post-import hooks).

Supported-version checks live in :func:`check_version`: an engine outside the declared range is
reported once and skipped, never patched.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Dict, Optional, Tuple

from packaging.specifiers import SpecifierSet
from packaging.version import Version

logger = logging.getLogger(__name__)

# name -> (state, detail); state in {"instrumented", "skipped", "absent", "error"}
STATUS: Dict[str, Tuple[str, str]] = {}


def installed_version(*dists: str) -> Optional[str]:
    for d in dists:
        try:
            return version(d)
        except PackageNotFoundError:
            continue
    return None


def check_version(name: str, dists: Tuple[str, ...], supported: str) -> Optional[str]:
    """Return the installed version if it is supported; otherwise record why and return None."""
    v = installed_version(*dists)
    if v is None:
        STATUS[name] = ("absent", f"{dists[0]} is not installed")
        return None
    if Version(v).release and Version(Version(v).base_version) not in SpecifierSet(supported):
        msg = f"{dists[0]} {v} is outside the supported range {supported}; not instrumented"
        if STATUS.get(name, ("",))[0] != "skipped":
            logger.warning("prism-otel: %s", msg)
        STATUS[name] = ("skipped", msg)
        return None
    return v


def unwrap_all(patched: list) -> None:
    """Undo the wrapt patches recorded as ``(module name, "Class.method")`` pairs, then forget them."""
    from opentelemetry.instrumentation.utils import unwrap

    for mod_name, target in patched:
        module = sys.modules.get(mod_name)
        if module is None:
            continue
        cls_name, meth = target.split(".")
        unwrap(getattr(module, cls_name), meth)
    patched.clear()
