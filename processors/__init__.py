"""Processors: the one implementation used both in-process (pipeline thread) and in the collector.

A processor sees every :class:`~prism_otel.record.StepRecord` in order and returns it, possibly with a
new verdict (``dataclasses.replace``); request-level processors see finished
:class:`~prism_otel.record.RequestRecord` s. See :mod:`processors.base`.
"""
