"""Event pooling and the host-clock fallback (the CPU path of every device timing)."""

from __future__ import annotations

import time

import torch

from prism_otel.device import timing
from prism_otel.device.timing import EventBank, EventPool, HostEvent


def test_host_event_measures_host_time():
    a, b = HostEvent(), HostEvent()
    a.record()
    time.sleep(0.02)
    b.record(stream=object())  # the stream is ignored on the host
    assert b.query()
    assert 15 <= a.elapsed_time(b) <= 200  # ms, like torch.Event


def test_pool_is_bounded_and_reuses_pairs():
    pool = EventPool("cpu", size=2)
    p1, p2 = pool.acquire(), pool.acquire()
    assert p1 is not None and p2 is not None and p1 is not p2
    assert pool.acquire() is None and pool.exhausted == 1  # never blocks, never grows
    p1.start.record()
    time.sleep(0.005)
    p1.finish()
    ns, how = p1.resolve()  # resolving gives the pair back
    assert how == "event" and 4e6 <= ns <= 2e8
    assert pool.acquire() is p1
    assert pool.created == 2


def test_bank_is_bounded():
    bank = EventBank(None, size=3)
    evs = [bank.take() for _ in range(3)]
    assert all(isinstance(e, HostEvent) for e in evs)
    assert bank.take() is None and bank.exhausted == 1
    bank.give(evs[:1])
    assert bank.take() is evs[0]


def test_sentinel_on_cpu_records_nothing():
    m = torch.nn.Linear(2, 2)
    assert timing.accelerator_of(m) is None
    assert timing.begin(None, m) is None  # no burst armed: the host clock of the forward is used
    timing.end(None)
    for mod in m.modules():
        assert not mod._forward_pre_hooks and not mod._forward_hooks


def test_generic_event_pairs_on_the_host_device_type():
    """The pool path used for accelerators, exercised with host events (device type "cpu")."""
    pair = timing.begin("cpu")
    assert pair is not None
    time.sleep(0.003)
    timing.end(pair)
    ns, how = pair.resolve()
    assert how == "event" and ns >= 2e6
