"""The processor contract shared by the in-process pipeline and the collector.

:class:`Processor` is what the chain (:mod:`processors.chain`) calls on every processor;
:class:`StepProcessor` is a base class that implements it with "pass everything through". The
optional parts are protocols of their own, checked with ``isinstance`` where the caller chooses what
to do (never by probing for attribute names): :class:`ProcessesMany` (a batch at once),
:class:`ObservesResource` (the resource attributes of each new instance), :class:`ForgetsInstance`
(drop what is kept for an instance) and :class:`KnowsInstanceBytes` (what is kept per instance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Protocol, runtime_checkable

from prism_otel.record import RequestRecord, StepRecord


@runtime_checkable
class Processor(Protocol):
    """Called on one thread (the pipeline's or the collector's), in step order. ``process`` returns
    the step (possibly with a new verdict) or None to take it out of the chain; ``process_request``
    the request (None: unchanged). Neither may block; what they raise is counted by the chain."""

    def process(self, step: StepRecord) -> Optional[StepRecord]: ...

    def process_request(self, request: RequestRecord) -> Optional[RequestRecord]: ...

    def shutdown(self) -> None: ...


@runtime_checkable
class ProcessesMany(Protocol):
    def process_many(self, steps: Sequence[StepRecord]) -> list[Optional[StepRecord]]: ...


@runtime_checkable
class ObservesResource(Protocol):
    def observe_resource(self, instance: str, resource: Mapping[str, Any]) -> None: ...


@runtime_checkable
class ForgetsInstance(Protocol):
    def forget_instance(self, instance: str) -> None: ...


@runtime_checkable
class KnowsInstanceBytes(Protocol):
    def instance_bytes(self, steps: int) -> int: ...


class StepProcessor:
    """Base class. Called on one thread (the pipeline's or the collector's), in step order.

    ``process`` must be cheap (it runs once per engine step: budget ~100 us) and must not raise;
    the caller catches and counts anything that does. Heavy work (model fitting) goes to a thread
    of the processor's own.
    """

    name = "base"

    def process(self, step: StepRecord) -> Optional[StepRecord]:
        return step

    def process_request(self, request: RequestRecord) -> Optional[RequestRecord]:
        return request

    def shutdown(self) -> None:
        pass
