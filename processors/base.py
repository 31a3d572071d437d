"""The processor contract shared by the in-process pipeline and the collector."""

from __future__ import annotations

from prism_otel.record import RequestRecord, StepRecord


class StepProcessor:
    """Base class. Called on one thread (the pipeline's or the collector's), in step order.

    ``process`` must be cheap (it runs once per engine step: budget ~100 us) and must not raise;
    the caller catches and counts anything that does. Heavy work (model fitting) goes to a thread
    of the processor's own.
    """

    name = "base"

    def process(self, step: StepRecord) -> StepRecord:
        return step

    def process_request(self, request: RequestRecord) -> RequestRecord:
        return request

    def shutdown(self) -> None:
        pass
