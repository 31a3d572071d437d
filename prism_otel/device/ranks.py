"""Tensor-parallel steps: the per-rank step records of one logical step, joined on rank 0.

Every rank of a tensor-parallel group runs the same steps in the same order, each in its own
process, recording into its own ring. With ``PRISM_OTEL_RANK_JOIN=1`` the join runs outside every
engine process: rank 0's companion reads the rings of the local ranks too (:class:`RankPeers`, in
:mod:`prism_otel.companion`), and :class:`RankJoin` is a processor (last in its chain):

* on rank 0 it waits (bounded, ``PRISM_OTEL_RANK_JOIN_TIMEOUT_MS``, 200 ms) for the other ranks'
  records of the same step index and returns one logical step (:func:`join_ranks`): its span is
  the one ``prism.step``, with one ``prism.rank.<n>`` child per rank carrying that rank's times and
  its kernel groups as ``prism.kernels.*`` children;
* a rank's own steps, read from its ring, are tagged with the rank and handed to rank 0's join
  (:class:`LocalTransport`) instead of being rendered (the step is rendered once, by the leader).

:class:`StoreTransport` (the torch.distributed store) remains for a pipeline an application runs in
its own processes with its own provider. No collective is issued and nothing runs on engine threads.

Which rank is slow: in a synchronous collective the ranks wait for the last one to arrive, so
every rank's step takes as long as the slowest one's; what differs is where the time goes. The
slow rank spends it computing, the others waiting inside the collective. So the slowest rank is
the one with the most device time outside collectives (``collective`` is a kernel group on
DeepDive steps), and its kernel group furthest above the other ranks' median says what was slow.
Without collective timings (Sentinel steps) the longest step names it, which is weaker.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.record import StepRecord
from processors.base import StepProcessor  # (the processors package ships in the same distribution)

logger = logging.getLogger(__name__)

_PREFIX = "prism-otel/steps"


def rank_info() -> tuple:
    """(rank, world size) of the default torch.distributed group, (0, 1) when there is none."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001
        pass
    return 0, 1


class StoreTransport:
    """Step records to the leader through a torch.distributed ``Store`` (keys deleted once read)."""

    def __init__(self, store=None, prefix: str = _PREFIX) -> None:
        if store is None:
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()
        self.store = store
        self.prefix = prefix
        self.sent = 0
        self.received = 0
        self.late = 0

    def _key(self, index: int, rank: int) -> str:
        return f"{self.prefix}/{index}/{rank}"

    def send(self, index: int, rank: int, payload: bytes) -> None:
        # torch's stub types the value as str; the binding takes bytes as well (std::string)
        self.store.set(self._key(index, rank), payload)  # pyright: ignore[reportArgumentType]
        self.sent += 1

    def fetch(self, index: int, ranks: Iterable[int], timeout_s: float) -> dict[int, bytes]:
        want = {r: self._key(index, r) for r in ranks}
        got: dict[int, bytes] = {}
        deadline = time.monotonic() + timeout_s
        delay = 0.0005
        while want:
            for r, k in list(want.items()):
                if self.store.check([k]):
                    got[r] = self.store.get(k)
                    self.store.delete_key(k)
                    del want[r]
            if not want or time.monotonic() >= deadline:
                break
            time.sleep(delay)
            delay = min(0.01, delay * 2)
        self.received += len(got)
        # A record that arrives after its step was joined stays in the store: clear an older step's keys.
        for r in ranks:
            if self.store.check([self._key(index - 64, r)]):
                self.store.delete_key(self._key(index - 64, r))
                self.late += 1
        return got


def _collective_ns(r: StepRecord) -> Optional[int]:
    return r.kernel_groups.get("collective") if r.kernel_groups else None


def join_ranks(records: Sequence[StepRecord], world_size: int, missing: Sequence[int] = ()) -> StepRecord:
    """One logical step from the records of its ranks (rank 0's, if present, gives the workload).

    The logical step spans the earliest start to the latest end; its device time is the longest
    rank's; its kernel groups are the slowest rank's (its critical path). Each rank record gains
    ``prism.rank.collective_ms`` / ``prism.rank.compute_ms`` where collectives were timed.
    """
    recs = sorted(records, key=lambda r: r.attributes.get(sc.RANK, 0))
    annotated: list[StepRecord] = []
    compute: dict[int, float] = {}
    timed = all(_collective_ns(r) is not None for r in recs)
    for r in recs:
        rank = r.attributes.get(sc.RANK, 0)
        dev = r.device_ns if r.device_ns is not None else r.duration_ns
        extra = {}
        coll = _collective_ns(r)
        if coll is not None:
            extra[sc.RANK_COLLECTIVE_MS] = coll / 1e6
            extra[sc.RANK_COMPUTE_MS] = (dev - coll) / 1e6
        compute[rank] = (dev - coll) if (timed and coll is not None) else r.duration_ns
        annotated.append(dataclasses.replace(r, attributes={**r.attributes, **extra}) if extra else r)
    slowest = max(compute, key=lambda k: compute[k])
    slow_rec = next(r for r in annotated if r.attributes.get(sc.RANK, 0) == slowest)
    attrs = {sc.RANK_COUNT: len(recs), sc.RANK_WORLD_SIZE: world_size, sc.RANK_SLOWEST: slowest,
             sc.RANK_SKEW_MS: (max(compute.values()) - min(compute.values())) / 1e6}
    if missing:
        attrs[sc.RANK_MISSING] = list(missing)
    group = _slowest_group(slow_rec, [r for r in annotated if r is not slow_rec])
    if group is not None:
        attrs[sc.RANK_SLOWEST_GROUP] = group
    lead = annotated[0]
    base = {k: v for k, v in lead.attributes.items() if k != sc.RANK}
    devs = [r.device_ns for r in annotated if r.device_ns is not None]
    return dataclasses.replace(
        lead, start_ns=min(r.start_ns for r in annotated), end_ns=max(r.end_ns for r in annotated),
        device_ns=max(devs) if devs else lead.device_ns, kernel_groups=dict(slow_rec.kernel_groups),
        attributes={**base, **attrs}, ranks=tuple(annotated))


def _slowest_group(slow: StepRecord, others: list[StepRecord]) -> Optional[str]:
    """The slow rank's non-collective group furthest above the other ranks' median for it."""
    if not slow.kernel_groups or not others:
        return None
    best, gap = None, 0
    for g, ns in slow.kernel_groups.items():
        if g == "collective":
            continue
        med = statistics.median(o.kernel_groups.get(g, 0) for o in others)
        if ns - med > gap:
            best, gap = g, ns - med
    return best


class RankJoin(StepProcessor):
    """Joins the ranks' steps on rank 0 (see the module docstring). Put it last in the chain."""

    name = "rank-join"

    def __init__(self, rank: Optional[int] = None, world_size: Optional[int] = None, transport=None,
                 timeout_ms: Optional[float] = None) -> None:
        r, w = rank_info()
        self.rank = r if rank is None else rank
        self.world = w if world_size is None else world_size
        self._transport = transport
        if timeout_ms is None:
            try:
                timeout_ms = float(os.environ.get(sc.ENV_RANK_JOIN_TIMEOUT_MS, 200))
            except ValueError:
                timeout_ms = 200.0
        self.timeout_s = timeout_ms / 1e3
        self.joined = 0
        self.incomplete = 0

    @property
    def transport(self):
        if self._transport is None:
            self._transport = StoreTransport()
        return self._transport

    def process(self, step: StepRecord) -> Optional[StepRecord]:
        step = dataclasses.replace(step, attributes={**step.attributes, sc.RANK: self.rank,
                                                     sc.RANK_WORLD_SIZE: self.world})
        if self.world <= 1:
            return step
        if self.rank != 0:
            self.transport.send(step.index, self.rank, pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL))
            return None
        others = self.transport.fetch(step.index, range(1, self.world), self.timeout_s)
        recs = [step] + [pickle.loads(b) if isinstance(b, (bytes, bytearray)) else b for b in others.values()]
        missing = [r for r in range(1, self.world) if r not in others]
        if missing:
            self.incomplete += 1
        self.joined += 1
        return join_ranks(recs, self.world, missing)


class LocalTransport:
    """The other ranks' step records, read by this (rank 0's) companion from their rings: ``put`` by the
    readers of the peers' rings, ``fetch`` by the join, which pumps those readers while it waits."""

    def __init__(self, pump=None) -> None:
        self._steps: dict[tuple, StepRecord] = {}
        self.pump = pump
        self.sent = 0  # records put (the other ranks' steps)
        self.received = 0
        self.late = 0

    def put(self, index: int, rank: int, step: StepRecord) -> None:
        self._steps[(index, rank)] = step
        self.sent += 1
        if len(self._steps) > 4096:  # records whose step was never joined
            for k in sorted(self._steps)[:1024]:
                del self._steps[k]
                self.late += 1

    def fetch(self, index: int, ranks: Iterable[int], timeout_s: float) -> dict[int, StepRecord]:
        want = list(ranks)
        got: dict[int, StepRecord] = {}
        deadline = time.monotonic() + timeout_s
        while True:
            for r in want:
                s = self._steps.pop((index, r), None)
                if s is not None:
                    got[r] = s
            want = [r for r in want if r not in got]
            if not want or time.monotonic() >= deadline:
                break
            if self.pump is not None:
                self.pump()
            if want:
                time.sleep(0.0005)
        self.received += len(got)
        for k in [k for k in self._steps if k[0] < index - 64]:
            del self._steps[k]
            self.late += 1
        return got


class RankForward(StepProcessor):
    """In rank 0's companion, on a peer rank's ring: tag the step with its rank, hand it to the join,
    render nothing of it."""

    name = "rank-forward"

    def __init__(self, rank: int, world: int, transport: LocalTransport) -> None:
        self.rank = rank
        self.world = world
        self.transport = transport
        self.forwarded = 0

    def process(self, step: StepRecord) -> Optional[StepRecord]:
        step = dataclasses.replace(step, attributes={**step.attributes, sc.RANK: self.rank,
                                                     sc.RANK_WORLD_SIZE: self.world})
        self.transport.put(step.index, self.rank, step)
        self.forwarded += 1
        return None


def rank_processors() -> list:
    """``[RankJoin()]`` when ``PRISM_OTEL_RANK_JOIN=1`` and torch.distributed runs with several ranks."""
    if os.environ.get(sc.ENV_RANK_JOIN, "0") != "1":
        return []
    r, w = rank_info()
    return [RankJoin(r, w)] if w > 1 else []
