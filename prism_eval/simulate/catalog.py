"""Every fault of the toolkit by name: the host faults (:mod:`.faults`) and the GPU ones (:mod:`.gpu`).

A module of its own because the GPU faults build on the host faults' classes: the catalogue sits
above both, so neither imports the other back.
"""

from __future__ import annotations

from typing import Optional

from prism_eval.simulate import gpu
from prism_eval.simulate.faults import CPU_FAULTS


def all_faults() -> dict[str, type]:
    return {**CPU_FAULTS, **gpu.GPU_FAULTS}


def expected_cause(fault: str, params: Optional[dict] = None) -> str:
    """The root cause a correct diagnosis names for an episode of ``fault`` with ``params``."""
    cls = all_faults().get(fault)
    if cls is None:
        raise ValueError(f"unknown fault {fault!r}")
    return cls.cause_for(params)
