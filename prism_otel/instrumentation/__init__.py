"""Engine instrumentations. Each is an OTel ``BaseInstrumentor`` whose wrappers only write to the
hot-path :class:`~prism_otel.recorder.Recorder`; none imports its engine at module level (hooks are
installed when the engine's module is imported, through post-import hooks).

Version checks live in :func:`check_version`: an engine outside the supported range is reported once
and skipped, never patched; one inside it but newer than the tested range is patched with a warning,
each hook point checked on its own (:mod:`._patch`).
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from prism_otel import semconv as sc

logger = logging.getLogger(__name__)

# name -> (state, detail); state in {"instrumented", "skipped", "absent", "error"}
STATUS: dict[str, tuple[str, str]] = {}
# name -> why the installed engine version is outside the tested range (it is instrumented all the same)
UNTESTED: dict[str, str] = {}


def installed_version(*dists: str) -> Optional[str]:
    for d in dists:
        try:
            return version(d)
        except PackageNotFoundError:
            continue
    return None


def check_version(name: str, dists: tuple[str, ...], supported: str, tested: Optional[str] = None) -> Optional[str]:
    """Return the installed version if it is supported; otherwise record why and return None.

    ``tested``: the narrower range the suite ran on. A version outside it (but supported) is
    instrumented, with one warning: its hook points are checked one by one."""
    v = installed_version(*dists)
    if v is None:
        STATUS[name] = ("absent", f"{dists[0]} is not installed")
        return None
    base = Version(Version(v).base_version) if Version(v).release else None
    forced = os.environ.get(sc.ENV_ALLOW_UNSUPPORTED, "") == "1"
    if base is not None and base not in SpecifierSet(supported) and not forced:
        msg = f"{dists[0]} {v} is outside the supported range {supported}; not instrumented"
        if STATUS.get(name, ("",))[0] != "skipped":
            logger.warning("prism-otel: %s", msg)
        STATUS[name] = ("skipped", msg)
        return None
    if base is not None and tested and base not in SpecifierSet(tested):
        where = "newer than" if base in SpecifierSet(supported) else f"forced ({sc.ENV_ALLOW_UNSUPPORTED}=1), outside"
        msg = (f"{dists[0]} {v} is {where} the tested range {tested}: instrumented, each hook point checked "
               f"on its own (prism_otel.status() lists any that changed)")
        if name not in UNTESTED:
            logger.warning("prism-otel: %s", msg)
        UNTESTED[name] = msg
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
