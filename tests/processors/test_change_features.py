"""What changed since the previous step, as a detector feature: exact from the record (request ids), derived
from consecutive rows where only a steps.csv is given, and the two agree on a continuous-batching stream."""

from __future__ import annotations

import random

from prism_eval.simulate import stepcsv
from prism_otel.pipeline import ChangeTracker
from prism_otel.record import BatchChange, StepRecord
from processors.features import AFTER_EVENT, EVENT, FEATURE_NAMES, ORDINARY, SINCE_CAP, StepContext, step_class

CHANGE = [FEATURE_NAMES.index(n) for n in ("joined", "left", "tokens_joined", "batch_before", "since_change")]


def cb_stream(n_steps=600, seed=3):
    """A continuous-batching engine's steps: requests join with their prompt prefilled in their first step
    (a mixed step), each then decodes one token per step, and leaves when its output is done. Context read =
    the tokens each request has processed so far (as the engines report it). Yields (step, request tuples)."""
    rng = random.Random(seed)
    active = {}  # id -> [prompt, done_tokens, out_left]
    nid = 0
    t = 1_000_000_000
    for i in range(n_steps):
        joining = []
        if len(active) < 12 and rng.random() < 0.25:
            for _ in range(rng.choice((1, 1, 2))):
                nid += 1
                joining.append(nid)
                active[nid] = [rng.randint(8, 300), 0, rng.randint(3, 40)]
        reqs, pre, dec, ctx, mx = [], 0, 0, 0, 0
        for rid, r in active.items():
            if r[1] == 0:  # its first step: the prompt
                tok = r[0]
                pre += tok
            else:
                tok = 1
                dec += 1
            r[1] += tok
            ctx += r[1]
            mx = max(mx, r[1])
            reqs.append((f"r{rid}", tok, r[1] > tok))
        if not reqs:
            t += 5_000_000
            continue
        phase = "mixed" if pre and dec else ("prefill" if pre else "decode")
        dur = 4_000_000 + 20_000 * len(reqs) + 3_000 * pre
        yield StepRecord("i", i, t, t + dur, phase, len(reqs), pre, dec, ctx, mx), reqs
        t += dur + 50_000
        for rid in list(active):
            r = active[rid]
            if r[1] > r[0]:
                r[2] -= 1
            if r[2] <= 0:
                del active[rid]


def test_derived_change_matches_the_exact_one_on_a_continuous_batching_stream():
    exact, derived = ChangeTracker(), StepContext()
    via_record = StepContext()
    n = both = 0
    for step, reqs in cb_stream():
        ch = exact.change(reqs)
        d = derived.features(step.instance, step.batch_size, step.prefill_tokens, step.decode_tokens,
                             step.context_tokens, step.max_context_tokens, step.start_ns, step.end_ns)
        e = via_record.features(step.instance, step.batch_size, step.prefill_tokens, step.decode_tokens,
                                step.context_tokens, step.max_context_tokens, step.start_ns, step.end_ns, ch)
        got = [d[k] for k in CHANGE]
        want = [float(v) for v in (ch.joined, ch.left, ch.tokens_joined, ch.batch_before,
                                   min(ch.steps_since_change, SINCE_CAP))]
        assert [e[k] for k in CHANGE] == want  # the record's change is used as it is
        assert d[:9] == e[:9]  # the workload features do not depend on where the change came from
        # steps since the change, the batch before and the tokens joining: always as the request ids say;
        # requests joined and left: the net change of the batch, exact unless requests join and leave at once
        assert got[2:] == want[2:], (step.index, got, want)
        if ch.joined and ch.left:
            both += 1
            assert got[0] - got[1] == want[0] - want[1]
        else:
            assert got[:2] == want[:2], (step.index, got, want)
        n += 1
    assert n > 400 and both < n // 10


def test_step_classes_follow_the_change():
    ctx = StepContext()
    steps = [s for s, _ in cb_stream(300, seed=5)]
    classes = [step_class(ctx.features(s.instance, s.batch_size, s.prefill_tokens, s.decode_tokens, s.context_tokens,
                                       s.max_context_tokens, s.start_ns, s.end_ns)) for s in steps]
    assert {EVENT, AFTER_EVENT, ORDINARY} == set(classes)
    for s, c in zip(steps, classes):
        if s.prefill_tokens:
            assert c == EVENT  # a step that prefills a joining request is an event step
    # a pause of more than a second starts a new run: its first step is an event
    last = steps[-1]
    x = ctx.features(last.instance, last.batch_size, 0, last.batch_size, last.context_tokens + last.batch_size,
                     last.max_context_tokens, last.end_ns + 2_000_000_000, last.end_ns + 2_010_000_000)
    assert step_class(x) == EVENT and x[FEATURE_NAMES.index("batch_before")] == 0


def test_steps_csv_carries_the_exact_change_and_derives_it_without(tmp_path):
    pairs = list(cb_stream(80, seed=7))
    tracker = ChangeTracker()
    steps = []
    for s, reqs in pairs:
        steps.append(StepRecord(**{**s.__dict__, "change": tracker.change(reqs)}))
    p = tmp_path / "steps.csv"
    stepcsv.write(str(p), steps)
    header, _, back, bad = stepcsv.read(str(p))
    assert not bad and set(stepcsv.CHANGE_COLUMNS) <= set(header)
    assert [b.change for b in back] == [s.change for s in steps]
    assert all(isinstance(b.change, BatchChange) for b in back)
    # the corpus columns alone (what a stream recorded elsewhere has): no change in the record, derived later
    plain = tmp_path / "plain.csv"
    stepcsv.write(str(plain), [StepRecord(**{**s.__dict__, "change": None}) for s in steps])
    header, _, back, _ = stepcsv.read(str(plain))
    assert not set(stepcsv.CHANGE_COLUMNS) & set(header) and all(b.change is None for b in back)


def test_a_decode_only_stream_still_sees_requests_swap():
    """A stream of decode steps alone (the prefill steps kept elsewhere): a request that leaves while another
    joins leaves the batch size as it was; the context read, which grows by one token per request per step
    in an unchanged batch, tells the change."""
    exact, derived = ChangeTracker(), StepContext()
    swaps = 0
    for step, reqs in cb_stream(1500, seed=11):
        if step.prefill_tokens:
            continue
        ch = exact.change(reqs)
        d = derived.features(step.instance, step.batch_size, 0, step.decode_tokens, step.context_tokens,
                             step.max_context_tokens, step.start_ns, step.end_ns)
        assert d[CHANGE[4]] == min(ch.steps_since_change, SINCE_CAP) and d[CHANGE[3]] == ch.batch_before
        swaps += ch.joined > 0 and ch.joined == ch.left
    assert swaps >= 3
