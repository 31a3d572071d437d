"""The one error a bad configuration raises, wherever it was written: the collector's YAML, a
processor's options, an environment variable.

:class:`ConfigError` is a ``ValueError`` carrying the path of the bad key: ``path`` as written where it
was found (``receivers::otlp::protocols`` in the Collector's ``::`` notation; ``baseline_key.gpu`` for a
processor's options, read from the environment or a ``key=value`` list) and ``keys``, the same path
as a tuple, so a caller that nests one config inside another (the collector's prism processors)
puts its own path in front with :meth:`ConfigError.under` and never parses the message. ``str()``
is ``"<path>: <message>"``. Nothing here imports anything of ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

PathLike = Union[str, Sequence[str]]


def join_path(*parts: PathLike) -> str:
    """``::``-joined path of ``parts`` (each a string or a sequence of keys; empty ones left out)."""
    out = []
    for p in parts:
        if not p:
            continue
        if isinstance(p, str):
            out.append(p)
        else:
            out.extend(str(x) for x in p if x != "")
    return "::".join(out)


class ConfigError(ValueError):
    """A config problem, found before anything starts. ``str()`` is ``"<path>: <message>"``.

    ``path``: a string (already in the notation of where it was written, its keys separated by
    ``sep``) or a sequence of keys (joined with ``sep``)."""

    def __init__(self, path: PathLike, message: str, sep: str = "::") -> None:
        if isinstance(path, str):
            self.path = path
        else:
            self.path = sep.join(str(k) for k in path if k != "")
        self.keys: tuple[str, ...] = tuple(self.path.split(sep)) if self.path else ()
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)

    def under(self, *prefix: PathLike) -> ConfigError:
        """The same error with ``prefix`` put in front of its path, in the Collector's ``::`` notation."""
        return ConfigError(join_path(*prefix, self.keys), self.message)
