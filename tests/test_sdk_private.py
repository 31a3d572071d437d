"""The SDK's private attributes prism-otel reads (prism_otel/_sdk_private.py) are where it expects them
in the installed opentelemetry-sdk: a release that moves one fails here, by name."""

from importlib.metadata import version

from opentelemetry.sdk.trace import TracerProvider
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from prism_otel import _sdk_private


def test_the_installed_sdk_has_what_we_read():
    assert _sdk_private.check() == []


def test_the_installed_sdk_is_in_the_tested_range():
    assert Version(version("opentelemetry-sdk")) in SpecifierSet(_sdk_private.TESTED)


def test_a_provider_gives_its_span_processor_and_other_objects_none():
    p = TracerProvider()
    try:
        assert callable(_sdk_private.active_span_processor(p).on_end)
    finally:
        p.shutdown()
    assert _sdk_private.active_span_processor(object()) is None
