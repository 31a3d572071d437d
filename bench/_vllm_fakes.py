"""Stand-ins for the vLLM engine objects that prism-otel's vLLM hooks read, and a maker of decode batches of
real vLLM request and output objects: shared by the vLLM benches (run with .venv-vllm's python)."""

from __future__ import annotations

import time
from concurrent.futures import Future


class KV:
    """The scheduler's kv_cache_manager: the hooks read ``usage``."""

    usage = 0.1


class Sched:
    """The scheduler the engine-core hooks see: its requests, KV manager, waiting queue, finished ids."""

    def __init__(self, reqs=(), kv=None):
        self.requests = {r.request_id: r for r in reqs}
        self.kv_cache_manager = kv if kv is not None else KV()
        self.waiting = []
        self.finished_req_ids = set()


class Runner:
    """A model runner the worker hooks wrap."""

    _prism_exec = None
    _prism_fwd = None


class Stub:
    """The engine's own functions as no-ops that return the current batch's objects (``cur``: ``so``, ``mro``,
    ``ecos``), for the hooks to wrap."""

    def __init__(self, cur: dict) -> None:
        self.cur = cur

    def schedule(self, *_a, **_k):
        return self.cur["so"]

    @staticmethod
    def execute(*_a, **_k):
        fut = Future()
        fut.set_result(None)
        return fut

    def sample(self, *_a, **_k):
        return self.cur["mro"]

    def update(self, *_a, **_k):
        return self.cur["ecos"]

    @staticmethod
    def noop(*_a, **_k):
        return None


def decode_batches(batch: int, max_tokens: int = 64):
    """A function returning the next decode batch of ``batch`` requests, all past their prompt:
    ``(requests, SchedulerOutput, ModelRunnerOutput, {0: EngineCoreOutputs})``, new request ids each call."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    sp = SamplingParams(max_tokens=max_tokens)
    state = {"gen": 0}

    def new_batch():
        g = state["gen"]
        state["gen"] += 1
        reqs = [Request(f"cmpl-{g:04d}-{i:02d}-0123456789abcdef", list(range(3, 43 + i % 7)), sp, None)
                for i in range(batch)]
        for r in reqs:
            r.num_computed_tokens = r.num_prompt_tokens + 10
            r.is_prefill_chunk = False
        ids = [r.request_id for r in reqs]
        cached = CachedRequestData(req_ids=ids, resumed_req_ids=set(), new_token_ids=[], all_token_ids={},
                                   new_block_ids=[None] * batch,
                                   num_computed_tokens=[r.num_computed_tokens - 1 for r in reqs],
                                   num_output_tokens=[10] * batch)
        so = SchedulerOutput(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                             num_scheduled_tokens={i: 1 for i in ids}, total_num_scheduled_tokens=batch,
                             scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={}, finished_req_ids=set(),
                             free_encoder_mm_hashes=[])
        mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={i: n for n, i in enumerate(ids)})
        ecos = {0: EngineCoreOutputs(outputs=[EngineCoreOutput(request_id=i, new_token_ids=[7]) for i in ids])}
        return reqs, so, mro, ecos

    return new_batch


def rotate(sched: Sched, cur: dict, new_batch, add) -> None:
    """Turn the batch over: the current requests finish, the next batch of ``new_batch`` becomes ``cur``
    (``reqs``, ``so``, ``mro``, ``ecos``) and the scheduler's requests, each arriving now through ``add(r)``."""
    sched.finished_req_ids = {r.request_id for r in cur.get("reqs", [])}
    reqs, so, mro, ecos = new_batch()
    cur.update(reqs=reqs, so=so, mro=mro, ecos=ecos)
    sched.requests = {r.request_id: r for r in reqs}
    now = time.time()
    for r in reqs:
        r.arrival_time = now
        add(r)
