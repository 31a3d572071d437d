"""vLLM instrumentation units on real vLLM objects (``vllm.v1.request.Request``, ``SchedulerOutput``,
``vllm.tracing``), in-process. Needs vLLM importable: ``tests/test_vllm.py`` runs this module with
``.venv-vllm``'s python; in an environment without vLLM it is skipped."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; tests/test_vllm.py runs this under .venv-vllm")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from prism_otel.instrumentation._hooks import HookGuard  # noqa: E402
from prism_otel.instrumentation.vllm import _engine  # noqa: E402

pytestmark = pytest.mark.vllm


class _Scheduler:
    """The scheduler attributes the hooks read (the real Scheduler needs a whole engine config)."""

    def __init__(self, reqs) -> None:
        self.requests = {r.request_id: r for r in reqs}
        self.kv_cache_manager = None
        self.waiting = []
        self.finished_req_ids = set()


def _req(rid, prompt, computed_after, outputs=0, chunk=None):
    r = Request(rid, list(range(3, 3 + prompt)), SamplingParams(max_tokens=64), None)
    for _ in range(outputs):
        r.append_output_token_ids(7)
    r.num_computed_tokens = computed_after  # what schedule() leaves: before + this step's tokens
    r.is_prefill_chunk = computed_after < r.num_tokens if chunk is None else chunk
    return r


def _new(r, c0):
    return NewRequestData(req_id=r.request_id, prompt_token_ids=r.prompt_token_ids, mm_features=[],
                          sampling_params=r.sampling_params, pooling_params=None, block_ids=([],),
                          num_computed_tokens=c0, lora_request=None)


def _so(new, cached, nst, resumed=()):
    ids = [c[0].request_id for c in cached]
    cd = CachedRequestData(req_ids=ids, resumed_req_ids=set(resumed), new_token_ids=[], all_token_ids={},
                           new_block_ids=[None] * len(ids), num_computed_tokens=[c[1] for c in cached],
                           num_output_tokens=[c[2] for c in cached])
    return SchedulerOutput(scheduled_new_reqs=new, scheduled_cached_reqs=cd, num_scheduled_tokens=nst,
                           total_num_scheduled_tokens=sum(nst.values()), scheduled_spec_decode_tokens={},
                           scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[])


def test_features_mixed_batch():
    dec = [_req(f"d{i}", 20, 20 + 5 + 1, outputs=6) for i in range(3)]  # decoding: 25 computed, +1
    chunk_new = _req("n-chunk", 100, 64)  # new, first 64 of a 100-token prompt: no token yet
    hit_new = _req("n-hit", 40, 40)  # new with a 32-token prefix hit: 8 more, then samples
    cont = _req("c-cont", 100, 100)  # chunked-prefill continuation: last 36 prompt tokens, samples
    resumed = _req("c-res", 10, 15, outputs=5)  # preempted and resumed: recomputes prompt + 5 outputs
    sched = _Scheduler(dec + [chunk_new, hit_new, cont, resumed])
    nst = {**{r.request_id: 1 for r in dec}, "n-chunk": 64, "n-hit": 8, "c-cont": 36, "c-res": 15}
    so = _so([_new(chunk_new, 0), _new(hit_new, 32)],
             [(r, 25, 6) for r in dec] + [(cont, 64, 0), (resumed, 0, 5)], nst, resumed=["c-res"])
    feat, reqs = _engine.features(sched, so)
    assert feat.batch_size == 7
    assert feat.prefill_tokens == 64 + 8 + 36 + 10
    assert feat.decode_tokens == 3 + 5
    assert feat.prefill_tokens + feat.decode_tokens == so.total_num_scheduled_tokens
    assert feat.context_tokens == 3 * 26 + 64 + 40 + 100 + 15
    assert feat.max_context_tokens == 100
    assert feat.phase == "mixed"
    got = {rid: (q, tok) for rid, q, tok in reqs}
    assert got == {**{r.request_id: (1, True) for r in dec}, "n-chunk": (64, False), "n-hit": (8, True),
                   "c-cont": (36, True), "c-res": (15, True)}
    assert len(reqs) == 7 and reqs[3] == ("n-chunk", 64, False)


def test_features_pure_decode_touches_no_request():
    """Decode-only steps are summed from vLLM's lists; the Request objects are not needed."""
    dec = [_req(f"d{i}", 30, 40, outputs=10) for i in range(5)]
    so = _so([], [(r, 39, 10) for r in dec], {r.request_id: 1 for r in dec})
    feat, reqs = _engine.features(_Scheduler([]), so)
    assert (feat.phase, feat.prefill_tokens, feat.decode_tokens, feat.context_tokens) == ("decode", 0, 5, 200)
    assert all(tok for _, _, tok in reqs)


def test_failing_hook_counts_and_never_breaks_the_engine():
    from prism_otel.recorder import Recorder

    g = HookGuard("test.schedule")
    g.max_errors = 2
    w = _engine.wrap_schedule(g, Recorder(1024))
    r = _req("x", 10, 10)
    so = _so([_new(r, 0)], [], {"x": 10})

    class Broken:  # a scheduler whose requests cannot be read
        finished_req_ids = set()
        waiting = []

        @property
        def requests(self):
            raise RuntimeError("boom")

    for _ in range(3):
        assert w(lambda *a, **k: so, Broken(), (), {}) is so
    assert g.errors == 2 and g.disabled
    _engine._INFLIGHT.clear()


def test_outside_supported_range_reports_and_patches_nothing():
    from vllm.v1.core.sched import scheduler

    from prism_otel.instrumentation import STATUS
    from prism_otel.instrumentation.vllm import VLLMInstrumentor

    before = scheduler.Scheduler.schedule
    inst = VLLMInstrumentor()
    inst.instrument(supported="<0.1")
    try:
        assert STATUS["vllm"][0] == "skipped" and "outside the supported range" in STATUS["vllm"][1]
        assert scheduler.Scheduler.schedule is before
        assert inst.patched == []
    finally:
        inst.uninstrument()


def test_vllm_tracer_setup_shares_our_provider(monkeypatch):
    """vLLM's init_tracer lands on prism-otel's provider; the endpoint gets one exporter, not two."""
    import vllm.tracing
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    import prism_otel
    from prism_otel.instrumentation.vllm import _tracing

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "unset")  # restored after the test
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    provider = TracerProvider()
    rt = prism_otel.start(tracer_provider=provider, processors=[], instrument=False)
    try:
        assert _tracing.install(vllm.tracing)
        n0 = len(provider._active_span_processor._span_processors)
        vllm.tracing.init_tracer("vllm.llm_engine", "http://127.0.0.1:4317")
        vllm.tracing.init_tracer("vllm.llm_engine", "127.0.0.1:4317/")  # the same endpoint, spelled otherwise
        assert len(provider._active_span_processor._span_processors) == n0 + 1
        assert trace.get_tracer_provider() is provider
        assert rt.provider is provider
    finally:
        _tracing.uninstall()
        prism_otel.stop()


def test_batch_queue_order_gives_each_batch_its_step():
    """The call order of EngineCore.step_with_batch_queue (batch B scheduled and launched before A is
    updated, futures completing later): each batch gets its own step, features and stages."""
    from concurrent.futures import Future

    from prism_otel import semconv as sc
    from prism_otel.record import STEP
    from prism_otel.recorder import Recorder

    rec = Recorder(1024)
    reader = rec.reader()
    _engine._INFLIGHT.clear()
    g = HookGuard("test.bq")
    sched_w, exec_w = _engine.wrap_schedule(g, rec), _engine.wrap_execute_model(g, rec)
    samp_w, upd_w = _engine.wrap_sample_tokens(g, rec), _engine.wrap_update_from_output(g, rec)
    ra, rb = _req("a", 12, 12), _req("b", 30, 30)
    sched = _Scheduler([ra, rb])
    so_a = _so([_new(ra, 0)], [], {"a": 12})
    so_b = _so([_new(rb, 0)], [], {"b": 30})
    futs = {}

    def launch(name):
        def fn(*a, **k):
            futs[name] = Future()
            return futs[name]
        return fn

    sched_w(lambda *a, **k: so_a, sched, (), {})
    exec_w(launch("xa"), None, (so_a,), {"non_block": True})
    samp_w(launch("sa"), None, (None,), {"non_block": True})
    sched_w(lambda *a, **k: so_b, sched, (), {})  # queue not full yet: B goes in before A is done
    exec_w(launch("xb"), None, (so_b,), {"non_block": True})
    samp_w(launch("sb"), None, (None,), {"non_block": True})
    for f in ("xa", "sa"):
        futs[f].set_result(None)
    upd_w(lambda *a, **k: {}, sched, (so_a, None), {})
    for f in ("xb", "sb"):
        futs[f].set_result(None)
    upd_w(lambda *a, **k: {}, sched, (so_b, None), {})
    rec.flush()
    steps = [r for kind, r in reader.read() if kind == STEP]
    assert [s.key for s in steps] == [id(so_a), id(so_b)]
    (a, b) = steps
    assert a.features.prefill_tokens == 12 and b.features.prefill_tokens == 30
    assert [r[0] for r in a.requests] == ["a"] and [r[0] for r in b.requests] == ["b"]
    assert a.attributes[sc.STEP_OVERLAP] == 0 and b.attributes[sc.STEP_OVERLAP] == 1
    for s in (a, b):
        stages = {n: (t0, t1) for n, t0, t1 in s.stages}
        assert list(stages) == [sc.STAGE_SCHEDULE, sc.STAGE_FORWARD, sc.STAGE_SAMPLE, sc.STAGE_UPDATE]
        assert s.attributes[sc.STEP_TIMING_SOURCE] == "executor"
        assert s.t0 <= stages[sc.STAGE_SCHEDULE][0] and stages[sc.STAGE_UPDATE][1] == s.t1
        assert stages[sc.STAGE_FORWARD][0] <= stages[sc.STAGE_FORWARD][1] <= stages[sc.STAGE_SAMPLE][1] \
            <= stages[sc.STAGE_UPDATE][0]
    assert b.t0 < a.t1, "B was scheduled before A finished: the two steps overlap"
    assert not _engine._INFLIGHT and g.errors == 0


def test_every_hook_point_matches_the_installed_vllm():
    """The signature check passes every hook point of the tested release: none is skipped there."""
    import importlib

    from prism_otel.instrumentation._patch import signature_change
    from prism_otel.instrumentation.vllm import HOOK_POINTS

    seen = 0
    for hp in HOOK_POINTS:
        try:
            module = importlib.import_module(hp.module)
        except ImportError:  # ray, model runner V2: not in every build
            continue
        cls = getattr(module, hp.cls_name, None)
        func = getattr(cls, hp.method, None) if cls is not None else None
        if hp.own and (func is None or hp.method not in vars(cls)):
            continue
        assert func is not None, f"{hp.target} is gone"
        assert signature_change(func, hp.params) is None, (hp.target, signature_change(func, hp.params))
        seen += 1
    assert seen >= 12
