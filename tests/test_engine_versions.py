"""An engine release that changed a method we hook: that hook point is reported once (log and
``prism_otel.status()``) and skipped, and everything else keeps working.

The changed release is real: transformers 5.5.0 (in .venv-tf-changed, Makefile ``TF_CHANGED``), whose
``ContinuousBatchProcessor._generation_step`` takes a second required parameter (``logit_processor``)
and whose request state has no ``query_length`` (read by the schedule hook). It is below the supported
range, so the run forces it (``PRISM_OTEL_ALLOW_UNSUPPORTED=1``), which is also how a newer, untested
release is treated: each hook point checked on its own. The engine runs under ``prism-otel run`` and
exports over OTLP gRPC to a real sink; its outputs are compared with a run without prism-otel."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from prism_otel import semconv as sc
from tests.otlp_sink import OTLPSink
from tests.test_core_transformers import WORKLOAD, _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANGED = os.path.join(ROOT, ".venv-tf-changed", "bin")
FORWARD = "transformers.ContinuousBatchProcessor._generation_step"
SCHEDULE = "transformers.ContinuousBatchProcessor.prepare_next_batch"


@pytest.fixture(scope="module")
def changed_python():
    py = os.path.join(CHANGED, "python")
    assert os.path.exists(py), "the changed-release environment is missing: make .venv-tf-changed/.installed"
    v = subprocess.run([py, "-c", "import transformers; print(transformers.__version__)"], capture_output=True,
                       text=True, timeout=120)
    assert v.stdout.strip() == "5.5.0", v.stderr[-2000:]
    return py


def _run(py, tmp_path, name, prefix=(), **env):
    out = tmp_path / f"{name}.json"
    p = subprocess.run([*prefix, py, WORKLOAD, str(out), "--requests", "12"], env=_env(**env), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(out.read_text()), p.stderr


def test_changed_hook_point_is_reported_once_and_skipped_the_rest_works(changed_python, tmp_path):
    plain, _ = _run(changed_python, tmp_path, "plain")
    with OTLPSink() as sink:
        env = {sc.OTEL_EXPORTER_OTLP_ENDPOINT: sink.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
               "OTEL_BSP_SCHEDULE_DELAY": "200", sc.ENV_ALLOW_UNSUPPORTED: "1", sc.ENV_HOOK_MAX_ERRORS: "3"}
        traced, err = _run(changed_python, tmp_path, "traced", prefix=(os.path.join(CHANGED, "prism-otel"), "run",
                                                                         "--"), **env)
        n = len(plain["requests"])
        spans = sink.wait_for(lambda s: sum(sc.REQUEST_ID in x.attributes for x in s) >= n, timeout=30)
    # the engine is unaffected: the same tokens for every request
    assert [r["generated"] for r in traced["requests"]] == [r["generated"] for r in plain["requests"]]
    status = traced["prism_status"]["instrumentations"]
    # the re-signed method: skipped at patch time, said once, with what changed
    assert status[FORWARD][0] == "skipped" and "logit_processor" in status[FORWARD][1], status
    assert err.count(f"hook {FORWARD} skipped") == 1, err
    # the hook whose reads broke at run time: counted, said once, disabled, shown in status
    assert status[SCHEDULE][0] == "disabled" and "query_length" in status[SCHEDULE][1], status
    assert err.count(f"hook {SCHEDULE} failed") == 1 and err.count(f"hook {SCHEDULE} disabled") == 1, err
    assert "5.5.0" in status["transformers"][1] and status["transformers"][0] == "instrumented"
    # the other hook points work: one request span per request, with its prompt length and status
    reqs = {s.attributes[sc.REQUEST_ID]: s for s in spans if sc.REQUEST_ID in s.attributes}
    assert set(reqs) == {r["id"] for r in plain["requests"]}
    for r in traced["requests"]:
        assert reqs[r["id"]].attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] == r["prompt_tokens"]
        assert reqs[r["id"]].attributes[sc.REQUEST_STATUS] == "finished"
