"""Checks shared by the vLLM tests: what a run's spans (as an OTLP sink received them) must satisfy.

Each function asserts one property and returns what it found, so a failure names the property.
"""

from __future__ import annotations

from collections import defaultdict

from prism_otel import semconv as sc

STEP_STAGES = {sc.STAGE_SCHEDULE, sc.STAGE_FORWARD, sc.STAGE_SAMPLE, sc.STAGE_UPDATE}


def split(spans) -> dict[str, list]:
    out = defaultdict(list)
    for s in spans:
        a = s.attributes
        if s.name == sc.STEP_SPAN:
            out["steps"].append(s)
        elif s.name == sc.stage_span_name(sc.STAGE_DETOKENIZE) and not s.parent_id:
            out["detok"].append(s)
        elif s.name.startswith(sc.STAGE_SPAN_PREFIX):
            out["stages"].append(s)
        elif a.get(sc.GEN_AI_OPERATION_NAME) == sc.GEN_AI_OPERATION_TEXT_COMPLETION and sc.REQUEST_ID in a:
            out["requests"].append(s)
        else:
            out["other"].append(s)
    return out


def no_duplicates(spans) -> None:
    ids = [s.span_id for s in spans]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} spans received twice"


def tokens_add_up(steps, prompt_lens: list[int], gen_lens: list[int]) -> int:
    """Σ step tokens == Σ prompt + Σ generated − requests (no prefix caching, no preemption)."""
    total = sum(s.attributes[sc.BATCH_PREFILL_TOKENS] + s.attributes[sc.BATCH_DECODE_TOKENS] for s in steps)
    want = sum(prompt_lens) + sum(gen_lens) - len(prompt_lens)
    assert total == want, f"steps computed {total} tokens, vLLM computed {want}"
    prefill = sum(s.attributes[sc.BATCH_PREFILL_TOKENS] for s in steps)
    assert prefill == sum(prompt_lens), f"prefill tokens {prefill} != Σ prompt {sum(prompt_lens)}"
    return total


def stages_nest(steps, stages) -> None:
    by_id = {s.span_id: s for s in steps}
    kids = defaultdict(dict)
    for st in stages:
        parent = by_id.get(st.parent_id)
        assert parent is not None, f"{st.name} has no step parent"
        assert st.trace_id == parent.trace_id
        assert parent.start <= st.start <= st.end <= parent.end, f"{st.name} outside its step"
        kids[st.parent_id][st.attributes[sc.STAGE_NAME]] = (st.start, st.end)
    for s in steps:
        names = set(kids[s.span_id])
        assert STEP_STAGES <= names, f"step {s.attributes[sc.STEP_INDEX]} has stages {sorted(names)}"
        k = kids[s.span_id]
        order = [k[n] for n in (sc.STAGE_SCHEDULE, sc.STAGE_FORWARD, sc.STAGE_SAMPLE, sc.STAGE_UPDATE)]
        for (_a0, a1), (b0, _b1) in zip(order, order[1:]):
            assert a1 <= b0, f"stages out of order in step {s.attributes[sc.STEP_INDEX]}"


def requests_link_steps(steps, requests, prompt_lens, gen_lens, max_request_links: int = 16) -> None:
    step_ids = {s.span_id for s in steps}
    req_ids = {s.span_id for s in requests}
    assert len(requests) == len(prompt_lens), f"{len(requests)} request spans for {len(prompt_lens)} requests"
    assert sorted(r.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] for r in requests) == sorted(prompt_lens)
    assert sorted(r.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] for r in requests) == sorted(gen_lens)
    served = 0
    for r in requests:
        a = r.attributes
        n = a[sc.REQUEST_STEPS]
        served += n
        assert n >= a[sc.GEN_AI_USAGE_OUTPUT_TOKENS]
        assert len(r.links) == min(n, max_request_links)
        assert all(sid in step_ids for _, sid in r.links), "a request links to a span that is not a step"
        assert a[sc.REQUEST_TTFT_MS] > 0 and a[sc.REQUEST_QUEUE_MS] >= 0 and a[sc.REQUEST_PREFILL_MS] > 0
        assert a[sc.REQUEST_TTFT_MS] >= a[sc.REQUEST_PREFILL_MS]
        if a[sc.GEN_AI_USAGE_OUTPUT_TOKENS] > 1:
            assert a[sc.REQUEST_TPOT_MS] > 0
    assert served == sum(s.attributes[sc.BATCH_SIZE] for s in steps), "request steps != Σ batch sizes"
    for s in steps:
        assert len(s.links) == s.attributes[sc.BATCH_SIZE]
        assert all(sid in req_ids for _, sid in s.links), "a step links to a span that is not a request"


def detokenize_joins(steps, detok) -> int:
    """Every step that produced outputs has the front-end's processing of them, by the exact
    engine timestamp, with the same request ids, in another process."""
    by_ts = defaultdict(list)
    for d in detok:
        by_ts[d.attributes[sc.STEP_OUTPUTS_TS]].append(d)
    joined = 0
    for s in steps:
        ts = s.attributes.get(sc.STEP_OUTPUTS_TS)
        if ts is None:
            continue
        ds = by_ts.get(ts)
        assert ds, f"no front-end span for step {s.attributes[sc.STEP_INDEX]}"
        ids = set(s.attributes[sc.BATCH_REQUEST_IDS])
        for d in ds:
            assert set(d.attributes[sc.BATCH_REQUEST_IDS]) <= ids
            assert d.resource.get("process.pid") != s.resource.get("process.pid")
            assert d.attributes[sc.STAGE_OUTPUT_DELAY_MS] >= 0
        joined += 1
    assert joined, "no step carried an outputs timestamp"
    return joined
