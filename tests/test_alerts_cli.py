"""``prism-otel alerts``: incident logs read, followed as they grow, and the end when the process exits."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

from prism_otel import alerts_cli
from prism_otel import semconv as sc


def _event(kind, n=1, pid=4242):
    return {"event": kind, "time_unix_nano": time.time_ns(),
            "incident": {"id": f"i{n}", "number": n, "instance": f"h:{pid}", "start_ns": time.time_ns(),
                         "root_cause": "stage.update", "phases": {"decode": 9}, "steps_affected": 9,
                         "steps_judged": 30, "peak_ratio": 4.2, "duration_s": 2.5, "stages": []}}


def test_reads_then_follows_until_the_process_exits(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2.5)"])
    log = tmp_path / f"{sc.INCIDENT_LOG_PREFIX}{proc.pid}.jsonl"
    other = tmp_path / f"{sc.INCIDENT_LOG_PREFIX}1.jsonl"
    log.write_text(json.dumps(_event(sc.INCIDENT_EVENT_OPEN, pid=proc.pid)) + "\n")
    other.write_text(json.dumps(_event(sc.INCIDENT_EVENT_OPEN, 7, pid=1)) + "\n")

    def later():
        time.sleep(1.0)
        with open(log, "a") as f:  # written in two pieces: a half line is not read until it is whole
            line = json.dumps(_event(sc.INCIDENT_EVENT_CLOSE, pid=proc.pid)) + "\n"
            f.write(line[:20])
            f.flush()
            time.sleep(0.5)
            f.write(line[20:])

    threading.Thread(target=later, daemon=True).start()
    out = io.StringIO()
    t0 = time.monotonic()
    n = alerts_cli.follow([proc.pid], [str(tmp_path)], True, out=out, poll_s=0.1)
    proc.wait()
    lines = out.getvalue().splitlines()
    assert n == 2 and "INCIDENT #1 OPEN" in lines[0] and "INCIDENT #1 CLOSED" in lines[1]
    assert lines[-1].endswith("exited") and time.monotonic() - t0 < 10
    # without --pid: every process's log, once
    out = io.StringIO()
    assert alerts_cli.follow([], [str(tmp_path)], False, as_json=True, out=out) == 3
    assert {json.loads(x)["incident"]["number"] for x in out.getvalue().splitlines()} == {1, 7}


def test_cli_says_where_it_looked(tmp_path, capsys):
    from prism_otel.cli import main

    assert main(["alerts", "--dir", str(tmp_path)]) == 0
    assert str(tmp_path) in capsys.readouterr().err
