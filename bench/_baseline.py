"""The code of an earlier revision, for benches that compare against it in the same run.

``tree(rev)`` extracts ``rev`` (default: :data:`BEFORE`, the last commit before the engine-side
rewrite of issue 23) into a temporary directory with ``git archive`` and returns its path; run that
revision's own scripts there with ``PYTHONPATH`` set to it. Cached per process.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "8368bb0"  # main before issue 23: the deque ring, forwarder thread, SDK spans
_TREES: dict = {}


def tree(rev: str = BEFORE) -> str:
    if rev in _TREES:
        return _TREES[rev]
    d = tempfile.mkdtemp(prefix=f"prism-{rev}-")
    atexit.register(shutil.rmtree, d, True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=archive, check=True)
    _TREES[rev] = d
    return d


def env_for(path: str, base=None) -> dict:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = path
    return env
