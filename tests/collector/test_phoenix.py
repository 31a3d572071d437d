"""The whole path against a real backend: the official OTel OTLP exporters (gRPC and HTTP) → our
receivers → prism_anomaly (+ prism_fleet) → our otlp_grpc and otlp_http exporters → Phoenix
(``phoenix serve`` on loopback, its own venv: ``make .venv-phoenix/.installed``), queried back through
its REST API. Phoenix is stopped and restarted mid-stream and the collector is SIGKILLed and
restarted on its persistent queue; every span arrives exactly once (Phoenix keys spans by id)."""

from __future__ import annotations

import os
import random
import time

import pytest

from prism_otel import semconv as sc
from tests.collector.harness import (
    PHOENIX_BIN,
    CollectorProcess,
    Phoenix,
    client_provider,
    free_port,
    send_steps,
    span_ids,
    write_config,
)
from tests.collector.spans_util import make_step

pytestmark = pytest.mark.slow

PROCESSORS = {"prism_anomaly": {}, "prism_fleet": {"min_steps": 16, "window": 64}}


def _config(tmp_path, ph: Phoenix, ports):
    queue = {"storage": "file_storage", "queue_size": 2000, "num_consumers": 2}
    retry = {"initial_interval": "200ms", "max_interval": "2s", "max_elapsed_time": 0}
    procs = list(PROCESSORS)
    return {
        "extensions": {"file_storage": {"directory": str(tmp_path / "queue"), "create_directory": True}},
        "receivers": {
            "otlp/a": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{ports[0]}"}}},
            "otlp/b": {"protocols": {"http": {"endpoint": f"127.0.0.1:{ports[1]}"}}},
        },
        "processors": PROCESSORS,
        "exporters": {
            "otlp_grpc/phoenix": {"endpoint": f"127.0.0.1:{ph.grpc_port}", "tls": {"insecure": True},
                                  "sending_queue": queue, "retry_on_failure": retry},
            "otlp_http/phoenix": {"endpoint": ph.base, "sending_queue": queue, "retry_on_failure": retry},
        },
        "service": {"extensions": ["file_storage"], "pipelines": {
            "traces/a": {"receivers": ["otlp/a"], "processors": procs, "exporters": ["otlp_grpc/phoenix"]},
            "traces/b": {"receivers": ["otlp/b"], "processors": procs, "exporters": ["otlp_http/phoenix"]},
        }},
    }


def _steps(instance, start, n, slow=1.0, spikes=()):
    rng = random.Random(hash((instance, start)))
    out = []
    for i in range(start, start + n):
        batch = rng.randint(1, 16)
        dur = (2.0 + 0.6 * batch) * slow * (3.0 if i in spikes else 1.0)
        out.append(make_step(i, instance=instance, dur_ms=dur, batch=batch, context_tokens=batch * rng.randint(50, 400)))
    return out


@pytest.mark.timeout(900)
@pytest.mark.skipif(not os.path.exists(PHOENIX_BIN), reason="build Phoenix with `make .venv-phoenix/.installed`")
def test_official_exporters_to_phoenix_through_prism(tmp_path):
    (tmp_path / "phoenix").mkdir()
    ph = Phoenix(str(tmp_path / "phoenix")).start()
    ports = (free_port(), free_port())
    path = write_config(str(tmp_path / "c.yaml"), _config(tmp_path, ph, ports))
    log = str(tmp_path / "collector.log")
    col = CollectorProcess(path, log).start()
    # a: gRPC client, two healthy instances; b: HTTP client, one healthy and one slow from its first step.
    clients = {inst: client_provider(proto, ports[0] if proto == "grpc" else ports[1], inst,
                                     **{"prism.engine.framework": "transformers", "prism.device.kind": "cpu"})
               for inst, proto in (("a-1", "grpc"), ("a-2", "grpc"), ("b-1", "http"), ("b-slow", "http"))}
    spikes = set()  # a-1 runs 3x slower on these steps (chosen once the detector is trained)

    def send(start, n):
        for inst, (tp, _) in clients.items():
            send_steps(tp, _steps(inst, start, n, slow=2.0 if inst == "b-slow" else 1.0,
                                  spikes=spikes if inst == "a-1" else ()))
        for tp, _ in clients.values():
            assert tp.force_flush(60_000)

    def sent_ids():
        return [sid for tp, rec in clients.values() for sid in span_ids(rec.get_finished_spans())]

    def judged(lo, hi):
        """Whether every step lo..hi-1 of the healthy instances reached Phoenix with a verdict."""
        got = {(s["attributes"].get(sc.STEP_INSTANCE), s["attributes"].get(sc.STEP_INDEX))
               for s in ph.spans() if s["name"] == sc.STEP_SPAN and sc.LATENCY_EXPECTED_MS in s["attributes"]}
        return all((i, k) in got for i in ("a-1", "a-2", "b-1") for k in range(lo, hi))

    try:
        send(0, 60)
        # Phoenix acknowledges before it writes (a background inserter) and drops what it has not
        # written when stopped; that loss would be Phoenix's, so let it store what it acknowledged first.
        ph.wait_for(sent_ids(), timeout=120)
        ph.stop()  # backend down mid-stream: the collector keeps what it acknowledged on disk
        send(60, 60)
        time.sleep(1.0)
        col.kill()  # and crashes while the backend is still down
        col = CollectorProcess(path, log).start()
        ph.start()
        send(120, 220)  # prism_anomaly (default config) learns each instance from its first 200 steps
        step, deadline = 340, time.monotonic() + 300
        while True:  # its first fits run on a thread of its own: wait until verdicts come back
            send(step, 10)
            step += 10
            time.sleep(2.0)
            if judged(step - 10, step) or time.monotonic() > deadline:
                break
        first = step
        spikes.update(range(first + 40, first + 120, 5))
        send(first, 140)
        n_steps = first + 140
        sent = sent_ids()
        spans = ph.wait_for(sent, timeout=240)
    finally:
        for tp, _ in clients.values():
            tp.shutdown()
        col.stop()
        ph.stop()
    got = [s["context"]["span_id"] for s in spans]
    assert len(sent) == len(set(sent)) == 4 * n_steps * 4
    missing = set(sent) - set(got)
    where = sorted({(n, i // 40 * 40) for tp, rec in clients.values() for sp in rec.get_finished_spans()
                    if format(sp.context.span_id, "016x") in missing
                    for n, i in [(sp.resource.attributes["service.instance.id"],
                                  sp.attributes.get(sc.STEP_INDEX, -1))]})
    assert not missing, f"missing {len(missing)} spans (instance, step block): {where[:12]}"
    assert set(got) == set(sent)
    assert len(got) == len(set(got))
    steps = [s for s in spans if s["name"] == sc.STEP_SPAN]
    assert len(steps) == 4 * n_steps
    by_inst = {}
    for s in steps:
        a = s["attributes"]
        by_inst.setdefault(a[sc.STEP_INSTANCE], {})[a[sc.STEP_INDEX]] = s
    # prism_anomaly: a verdict on every step once trained; the injected spikes flagged, little else.
    late = [by_inst[i][k]["attributes"] for i in ("a-1", "a-2", "b-1") for k in range(first, n_steps)]
    assert all(sc.ANOMALY in a and sc.LATENCY_EXPECTED_MS in a for a in late)
    a1 = by_inst["a-1"]
    caught = [k for k in spikes if a1[k]["attributes"].get(sc.ANOMALY) is True]
    assert len(caught) >= 0.8 * len(spikes), f"spikes flagged: {sorted(caught)}"
    assert all(a1[k]["attributes"].get(sc.ANOMALY_ROOT_CAUSE) != "fleet:slower_than_peers" for k in caught)
    normal = [by_inst[i][k]["attributes"] for i in ("a-1", "a-2", "b-1") for k in range(first, n_steps)
              if not (i == "a-1" and k in spikes)]
    false_pos = sum(1 for a in normal if a.get(sc.ANOMALY) is True)
    assert false_pos <= 0.02 * len(normal), f"{false_pos} of {len(normal)} normal steps flagged"
    assert any(e["name"] == sc.ALERT_EVENT for k in spikes for e in a1[k]["events"])
    # prism_fleet: the instance that is slow from its first step is caught; its peers are not.
    slow = [by_inst["b-slow"][k]["attributes"] for k in range(200, n_steps)]
    assert all(a.get(sc.FLEET_SLOW) is True and a.get(sc.ANOMALY) is True for a in slow)
    assert not any(s["attributes"].get(sc.FLEET_SLOW) for i in ("a-1", "a-2", "b-1") for s in by_inst[i].values())
