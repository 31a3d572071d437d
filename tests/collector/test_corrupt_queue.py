"""Issue 16, finding 3: one corrupt record in the on-disk queue costs that record, not everything after it.

200 requests of 100 spans are acknowledged while the backend is down, the collector is SIGKILLed, one bit
of record 10 is flipped on disk, and the collector restarts with the backend up: the other 199 records
(19,900 spans) are delivered, and the bad record is counted (prism.collector.queue.corrupt_records) and
named in a warning, never replayed again."""

from __future__ import annotations

import os

import pytest

from prism_otel import semconv as sc
from tests.collector.harness import CollectorProcess, CountingSink, base_config, free_port, read_counters, write_config
from tests.collector.spans_util import make_step, render, to_request
from tests.collector.test_poison import export, ids_of


def flip_bit_everywhere(directory: str, needle: bytes, bit: int = 3) -> int:
    """Flip one bit of ``needle`` wherever the store keeps it (every file, every copy). Returns the count."""
    hits = 0
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                data = bytearray(fh.read())
            at = data.find(needle)
            changed = False
            while at != -1:
                data[at + len(needle) // 2] ^= 1 << bit
                hits += 1
                changed = True
                at = data.find(needle, at + len(needle))
            if changed:
                with open(path, "wb") as fh:
                    fh.write(data)
    return hits


@pytest.mark.timeout(300)
def test_a_flipped_bit_costs_one_record(tmp_path):
    sink = CountingSink()
    gp, hp = free_port(), free_port()
    cfg = base_config(gp, hp, exporters={"otlp_grpc": {
        "endpoint": f"127.0.0.1:{sink.port}", "tls": {"insecure": True}, "timeout": "2s",
        "sending_queue": {"storage": "file_storage", "queue_size": 1000},
        "retry_on_failure": {"initial_interval": "100ms", "max_interval": "500ms", "max_elapsed_time": 0}}},
        extensions={"file_storage": {"directory": str(tmp_path / "q"), "create_directory": True}})
    path = write_config(str(tmp_path / "c.yaml"), cfg)
    log = str(tmp_path / "collector.log")
    col = CollectorProcess(path, log).start()
    try:
        reqs = [to_request(render([make_step(100 * r + i, instance=f"i-{r % 3}") for i in range(25)],
                                  {"service.instance.id": f"i-{r % 3}"})) for r in range(200)]
        for req in reqs:  # backend down: everything is acknowledged into the queue
            export(gp, req)
        col.kill()
        raw = reqs[10].SerializeToString()
        assert flip_bit_everywhere(str(tmp_path / "q"), raw[len(raw) // 2:len(raw) // 2 + 16]) >= 1
        sink.start()
        col = CollectorProcess(path, log).start()
        want = [i for r, req in enumerate(reqs) if r != 10 for i in ids_of(req)]
        got = sink.wait_for(want, timeout=120)
        assert len(set(want) - set(got)) == 0, f"{len(set(want) - set(got))} of {len(want)} spans lost"
        assert col.stop() == 0
        counters = read_counters(log)
        assert counters.get(sc.COLLECTOR_CORRUPT_RECORDS) == 1
        with open(log) as fh:
            assert "record 10 " in fh.read()
        col = CollectorProcess(path, log).start()  # settled: not replayed at the next start
        assert col.stop() == 0
        assert read_counters(log).get(sc.COLLECTOR_CORRUPT_RECORDS, 0) == 0
        assert all(v == 1 for v in sink.snapshot().values())
    finally:
        col.stop()
        sink.stop()
