"""Exactly once by span id, end to end: the official OTel exporters send through a collector *process*
with a persistent queue to a backend that counts every delivery. The backend is stopped and restarted
mid-stream, and the collector is SIGKILLed twice and restarted on its queue: once while the backend is
down (what it held was only on disk), once right after a burst was acknowledged, while it is delivering.

Every span sent arrives. The only repeats allowed are spans whose send was in flight at the second
SIGKILL: the backend may have stored them without the collector living to record it, so they are sent
again (at-least-once; no OTLP sender can do better). Backends that key spans by id, like Phoenix,
store them once (tests/collector/test_phoenix.py). Everything replayed that *was* recorded as
delivered is skipped (counted in prism.collector.duplicate_spans_skipped)."""

from __future__ import annotations

import time

import pytest

from prism_otel import semconv as sc
from tests.collector.harness import (
    CollectorProcess,
    CountingSink,
    base_config,
    client_provider,
    free_port,
    send_steps,
    span_ids,
    write_config,
)
from tests.collector.spans_util import make_step


def _config(tmp_path, sink_port, grpc_port, http_port):
    return base_config(
        grpc_port, http_port,
        exporters={"otlp_grpc/backend": {
            "endpoint": f"127.0.0.1:{sink_port}", "tls": {"insecure": True}, "timeout": "2s",
            "sending_queue": {"storage": "file_storage", "queue_size": 5000, "num_consumers": 4},
            "retry_on_failure": {"initial_interval": "100ms", "max_interval": "1s", "max_elapsed_time": 0}}},
        extensions={"file_storage": {"directory": str(tmp_path / "queue"), "create_directory": True}})


def _batch(tp, start, n, instance):
    send_steps(tp, [make_step(i, instance=instance) for i in range(start, start + n)])
    time.sleep(0.3)


@pytest.mark.timeout(300)
def test_exactly_once_across_backend_restart_and_collector_sigkill(tmp_path):
    sink = CountingSink().start()
    grpc_port, http_port = free_port(), free_port()
    path = write_config(str(tmp_path / "c.yaml"), _config(tmp_path, sink.port, grpc_port, http_port))
    log = str(tmp_path / "collector.log")
    col = CollectorProcess(path, log).start()
    g_tp, g_sent = client_provider("grpc", grpc_port, "inst-grpc")
    h_tp, h_sent = client_provider("http", http_port, "inst-http")
    try:
        step = 0
        for _ in range(3):  # steady
            _batch(g_tp, step, 40, "inst-grpc")
            _batch(h_tp, step, 40, "inst-http")
            step += 40
        sink.stop()  # backend outage
        for _ in range(3):
            _batch(g_tp, step, 40, "inst-grpc")
            _batch(h_tp, step, 40, "inst-http")
            step += 40
        g_tp.force_flush(30_000)
        h_tp.force_flush(30_000)
        time.sleep(0.5)
        col.kill()  # crash while everything since the outage lives only in the queue on disk
        _batch(g_tp, step, 40, "inst-grpc")  # the client retries until the collector is back
        col = CollectorProcess(path, log).start()
        sink.start()  # backend back
        step += 40
        for _ in range(3):
            _batch(g_tp, step, 40, "inst-grpc")
            _batch(h_tp, step, 40, "inst-http")
            step += 40
        assert h_tp.force_flush(30_000)  # the OTel HTTP exporter does not ride out a dead collector
        burst_start = step
        send_steps(g_tp, [make_step(i, instance="inst-grpc") for i in range(step, step + 200)])
        g_tp.force_flush(30_000)  # acknowledged: on the collector's disk, maybe not yet delivered
        col.kill()  # crash mid-stream, backend up
        step += 200
        col = CollectorProcess(path, log).start()
        _batch(g_tp, step, 40, "inst-grpc")
        _batch(h_tp, step, 40, "inst-http")
        assert g_tp.force_flush(60_000) and h_tp.force_flush(60_000)
        sent = span_ids(g_sent.get_finished_spans()) + span_ids(h_sent.get_finished_spans())
        assert len(sent) == len(set(sent)) == (11 * 40 + 10 * 40 + 200) * 4
        got = sink.wait_for(sent, timeout=120)
        missing = set(sent) - set(got)
        extra = set(got) - set(sent)
        dups = {k: v for k, v in got.items() if v > 1}
        assert not missing, f"{len(missing)} spans lost"
        assert not extra
        dup_steps = sorted((sink.attrs[k].get(sc.STEP_INSTANCE), sink.attrs[k].get(sc.STEP_INDEX)) for k in dups
                           if sink.attrs[k].get(sc.STEP_INDEX) is not None)
        burst = {("inst-grpc", i) for i in range(burst_start, burst_start + 200)}
        assert set(dup_steps) <= burst, f"repeats outside the in-flight window: {dup_steps[:5]}"
        assert all(v == 2 for v in dups.values())
        assert len(dups) <= 4 * 256, "more repeats than the 4 consumers can have in flight"
        steps = [a for sid, a in sink.attrs.items() if a.get(sc.STEP_INDEX) is not None]
        assert len(steps) == 21 * 40 + 200
        with open(log) as fh:
            assert "records to replay" in fh.read()  # the first crash left data only on disk
    finally:
        g_tp.shutdown()
        h_tp.shutdown()
        col.stop()
        sink.stop()
