"""Learned baselines persisted and loaded by key, so a restart or a new replica needs no warm-up.

The key is what must match for a latency model to carry over: model, hardware, framework,
parallelism and versions (a dict of strings; missing fields are empty). One JSON file per key in
the baseline directory, named by a hash of the key, holds the fitted model (plain
numbers: :meth:`LatencyModel.to_dict`), the stage norms and a bounded sample of the normal steps it
was fitted on (so later refits still cover workloads the new process has not seen yet). No
pickle: a baseline file is data, safe to share, and readable with numpy alone. Writes are atomic
(temporary file then rename), so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Optional

from processors.config import invalid

logger = logging.getLogger(__name__)

KEY_FIELDS = ("model", "hardware", "framework", "parallelism", "versions")
FORMAT = 3  # 3: one model for every phase, scales per step class, bars chosen by injection; older files are ignored


def normalize_key(key: Optional[Mapping[str, str]]) -> dict[str, str]:
    key = dict(key or {})
    unknown = set(key) - set(KEY_FIELDS)
    if unknown:
        raise invalid(f"baseline_key.{sorted(unknown)[0]}", f"unknown key field (known: {', '.join(KEY_FIELDS)})")
    return {f: str(key.get(f, "") or "") for f in KEY_FIELDS}


def key_id(key: Mapping[str, str]) -> str:
    canon = json.dumps(normalize_key(key), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def path_for(directory: str, key: Mapping[str, str]) -> str:
    return os.path.join(directory, f"baseline-{key_id(key)}.json")


def load(directory: str, key: Mapping[str, str]) -> Optional[dict]:
    """The stored ``{"model": {...}}`` for ``key``, or None (missing, unreadable, or another key)."""
    path = path_for(directory, key)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("prism-otel: ignoring unreadable baseline %s: %s", path, exc)
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("key") != normalize_key(key):
        logger.warning("prism-otel: ignoring baseline %s: format or key does not match", path)
        return None
    return doc


def save(directory: str, key: Mapping[str, str], model: Mapping[str, object]) -> str:
    os.makedirs(directory, exist_ok=True)
    path = path_for(directory, key)
    doc = {"format": FORMAT, "key": normalize_key(key), "saved_at": time.time(), "model": dict(model)}
    fd, tmp = tempfile.mkstemp(prefix=".baseline-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
