"""One config error for every part: a processor's options, the environment and the collector's YAML
raise the same ``ConfigError`` (a ``ValueError``), whose path the collector extends without reading
the message."""

import pytest

from prism_otel import semconv as sc
from prism_otel.collector.errors import ConfigError as CollectorConfigError
from prism_otel.collector.prism_processors import config_class
from prism_otel.config_error import ConfigError
from processors.anomaly import AnomalyConfig
from processors.defaults import in_process_processors

PrismAnomalyConfig = config_class("prism_anomaly")
PrismSLOConfig = config_class("prism_slo")


def test_the_collector_raises_the_one_error_type():
    assert CollectorConfigError is ConfigError and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("bad, keys", [({"baseline_key": {"gpu": "x"}}, ("baseline_key", "gpu")),
                                       ({"alpha": "lots"}, ("alpha",)), ({"alpha": 0.7}, ("alpha",)),
                                       ({"nope": 1}, ("nope",))])
def test_a_processor_option_error_carries_its_keys(bad, keys):
    with pytest.raises(ConfigError) as e:
        AnomalyConfig.from_dict(bad)
    assert e.value.keys == keys and str(e.value).startswith(".".join(keys) + ": ")
    # in the collector the same error is put under the processor's YAML path
    with pytest.raises(ConfigError) as y:
        PrismAnomalyConfig.from_yaml(bad, "processors::prism_anomaly")
    assert y.value.path == "::".join(("processors", "prism_anomaly") + keys)
    assert y.value.message == e.value.message


def test_slo_key_path_in_the_collector():
    with pytest.raises(ConfigError) as e:
        PrismSLOConfig.from_yaml({"objective": 2}, "processors::prism_slo/x")
    assert e.value.path == "processors::prism_slo/x::objective" and "between 0 and 1" in e.value.message


def test_environment_error_names_the_variable(monkeypatch):
    monkeypatch.setenv(sc.ENV_BASELINE_KEY, "gpu=x")
    with pytest.raises(ConfigError) as e:
        in_process_processors()
    assert e.value.path == sc.ENV_BASELINE_KEY and e.value.message.startswith("baseline_key.gpu: ")


def test_one_decoder_for_the_collector_and_the_processors():
    """The collector's components and the processors' options go through the same decoder: typed YAML values
    strictly with ``::`` paths, an environment variable's strings read as the declared type with dotted ones."""
    from dataclasses import dataclass, field
    from typing import Optional

    from prism_otel.collector import decode as collector_decode
    from prism_otel.config_decode import Duration, check, decode
    from processors import config as processors_config

    assert collector_decode.decode is decode
    assert processors_config.build.__module__ == "processors.config"

    @dataclass
    class Inner:
        n: int = 1

        def validate(self) -> None:
            check(self.n > 0, "n", "must be > 0")

    @dataclass
    class Outer:
        rate: float = 0.5
        on: bool = False
        names: list = field(default_factory=list)
        wait: Duration = Duration(1.0)
        inner: Optional[Inner] = None

    got = decode(Outer, {"rate": "0.25", "on": "yes", "names": "a, b", "inner": {"n": "3"}}, "x", text=True, sep=".")
    assert (got.rate, got.on, got.names, got.inner.n) == (0.25, True, ["a", "b"], 3)
    got = decode(Outer, {"rate": 2, "wait": "200ms", "inner": None}, "p")
    assert (got.rate, got.wait, got.inner.n) == (2.0, 0.2, 1)
    with pytest.raises(ConfigError) as e:  # YAML: a string is not a number
        decode(Outer, {"rate": "0.25"}, "processors::p")
    assert str(e.value).startswith("processors::p::rate: expected a number")
    with pytest.raises(ConfigError) as e:  # validate() of a nested config, its path under the config's
        decode(Outer, {"inner": {"n": "0"}}, "x", text=True, sep=".")
    assert e.value.keys == ("x", "inner", "n") and str(e.value) == "x.inner.n: must be > 0"
    with pytest.raises(ConfigError) as e:
        decode(Outer, {"inner": {"n": 0}}, "a::b")
    assert e.value.keys == ("a", "b", "inner", "n")
