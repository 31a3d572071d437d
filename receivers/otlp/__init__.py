"""``otlp`` receiver: OTLP/gRPC ``TraceService/Export`` and OTLP/HTTP ``POST /v1/traces``.

Keys and defaults are the OpenTelemetry Collector's (see :mod:`receivers.otlp.config`); it binds
loopback unless told otherwise. Status mapping (the Collector's ``otlpreceiver`` errors):

| situation | gRPC | HTTP |
|---|---|---|
| undecodable body | INVALID_ARGUMENT | 400 |
| spans with invalid ids (protobuf or JSON) | OK + partial_success | 200 + partial_success |
| bad / missing bearer token | UNAUTHENTICATED | 401 |
| pipeline intake full, or the memory budget's receive share in use | RESOURCE_EXHAUSTED + RetryInfo | 429 + Retry-After |
| request head / message too slow | DEADLINE_EXCEEDED + RetryInfo (30 s) | connection closed (10 s head), 408 (body) |
| shutting down, storage failing | UNAVAILABLE + RetryInfo | 503 + Retry-After |
| body over the size limit | RESOURCE_EXHAUSTED (grpc core) | 413 |
"""

from prism_otel.collector.component import RECEIVER, Factory
from receivers.otlp.config import OTLPReceiverConfig
from receivers.otlp.receiver import OTLPReceiver

TYPE = "otlp"


def factory() -> Factory:
    return Factory(TYPE, RECEIVER, OTLPReceiverConfig, OTLPReceiver, stability="beta")


__all__ = ["TYPE", "OTLPReceiverConfig", "factory"]
