"""A throwaway distribution for the entry-point tests: one module and its ``.dist-info`` with entry-point
lines, in a directory put on ``sys.path`` (what ``pip install`` of a third party's package leaves)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


@contextmanager
def installed(tmp_path: Path, monkeypatch, module: str, source: str, group: str, lines: Sequence[str],
              reload: Callable[[], None]) -> Iterator[Path]:
    """``module`` (its ``source``) and ``group``'s entry-point ``lines`` installed under ``tmp_path/site``;
    ``reload`` (the registry's) runs after installing and after removing it. Yields the site directory."""
    site = tmp_path / "site"
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (site / f"{module}.py").write_text(source)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(line + "\n" for line in lines))
    monkeypatch.syspath_prepend(str(site))
    reload()
    try:
        yield site
    finally:
        monkeypatch.undo()
        sys.modules.pop(module, None)
        reload()
