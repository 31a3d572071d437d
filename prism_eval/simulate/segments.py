"""Workload segments: one engine, many workload configurations in a row (the real-data corpus).

A segment holds one workload configuration for ``duration_s`` seconds:

* ``closed``: ``concurrency`` clients, each sending its next request as soon as its last one finished
  (the concurrency a load generator or a batch job keeps);
* ``tidal``: open-loop arrivals whose rate follows ``rate * (1 + tide * sin(2 pi t / period_s))``. With
  ``rate: 0`` the rate is ``rate_frac`` times the throughput the previous segment measured (so a tidal
  segment after a closed one loads the engine about as much, whatever the engine's speed).

Prompt and output lengths are log-normal (:class:`~prism_eval.simulate.workload.Lengths`). Segments run
back to back; a segment ends when its time is up and its last request finished, so its steps are that
configuration's, ramp-down included. :func:`run` is shared by the in-process engine driver and the HTTP
engines: both hand it a blocking ``submit(request_id, prompt_tokens, output_tokens)``.
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from prism_eval.simulate.workload import Lengths

MODES = ("closed", "tidal")


@dataclass(frozen=True)
class Segment:
    name: str
    mode: str = "closed"
    concurrency: int = 1
    prompt: Lengths = field(default_factory=lambda: Lengths(median=32, sigma=0.5, min=4, max=400))
    output: Lengths = field(default_factory=lambda: Lengths(median=24, sigma=0.5, min=2, max=160))
    duration_s: float = 12.0
    rate: float = 0.0
    rate_frac: float = 0.7
    tide: float = 0.6
    period_s: float = 8.0
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> Segment:
        d = dict(d)
        for k in ("prompt", "output"):
            if isinstance(d.get(k), dict):
                d[k] = Lengths(**d[k])
        seg = cls(**d)
        if seg.mode not in MODES:
            raise ValueError(f"segment {seg.name}: mode must be one of {MODES}, got {seg.mode!r}")
        if seg.concurrency < 1 or seg.duration_s <= 0 or seg.rate < 0 or not 0 <= seg.tide < 1:
            raise ValueError(f"segment {seg.name}: concurrency >= 1, duration_s > 0, rate >= 0, 0 <= tide < 1")
        return seg

    def to_dict(self) -> dict:
        return asdict(self)


Submit = Callable[[str, int, int], int]  # (request id, prompt tokens, output tokens) -> tokens generated


def _closed(seg: Segment, submit: Submit, end: float, rng_seed: int, counter, on_request) -> None:
    def client(c: int) -> None:
        rng = random.Random(rng_seed * 1000 + c)
        while time.monotonic() < end:
            p, o = seg.prompt.draw(rng), seg.output.draw(rng)
            rid = f"{seg.name}-{next(counter)}"
            t = time.time_ns()
            n, err = _one(submit, rid, p, o)
            on_request(rid, seg.name, t, p, n, err)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(seg.concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _tidal(seg: Segment, rate: float, submit: Submit, end: float, rng_seed: int, counter, on_request) -> None:
    rng = random.Random(rng_seed)
    peak = rate * (1.0 + seg.tide)
    t0 = time.monotonic()
    threads = []

    def one(rid: str, p: int, o: int) -> None:
        t = time.time_ns()
        n, err = _one(submit, rid, p, o)
        on_request(rid, seg.name, t, p, n, err)

    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t0 + t >= end:
            break
        if rng.random() * peak > rate * (1.0 + seg.tide * math.sin(2 * math.pi * t / seg.period_s)):
            continue
        p, o = seg.prompt.draw(rng), seg.output.draw(rng)
        delay = t0 + t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(f"{seg.name}-{next(counter)}", p, o), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()


def _one(submit: Submit, rid: str, p: int, o: int):
    try:
        return submit(rid, p, o), None
    except Exception as exc:  # noqa: BLE001 - recorded with the request
        return 0, repr(exc)


def run(segments: list[Segment], submit: Submit, on_request: Optional[Callable] = None,
        on_segment: Optional[Callable[[dict], object]] = None) -> list[dict]:
    """Run ``segments`` in order against ``submit``; returns one record per segment: its name, wall-clock
    bounds (``t_start_ns``, ``t_end_ns``: from its first request to its last one's end), the requests
    it served and its measured throughput (requests per second)."""
    import itertools

    counter = itertools.count()
    out: list[dict] = []
    lock = threading.Lock()
    served = {"n": 0, "errors": 0}

    def note(rid, name, t, p, n, err):
        with lock:
            served["n"] += 1
            served["errors"] += err is not None
        if on_request is not None:
            on_request(rid, name, t, p, n, err)

    last_tput = 0.0
    for i, seg in enumerate(segments):
        served["n"] = served["errors"] = 0
        t_start = time.time_ns()
        m0 = time.monotonic()
        end = m0 + seg.duration_s
        if seg.mode == "closed":
            _closed(seg, submit, end, seg.seed or i + 1, counter, note)
            rate = 0.0
        else:
            rate = seg.rate or max(0.2, seg.rate_frac * last_tput)
            _tidal(seg, rate, submit, end, seg.seed or i + 1, counter, note)
        elapsed = time.monotonic() - m0
        tput = served["n"] / elapsed if elapsed > 0 else 0.0
        if seg.mode == "closed":
            last_tput = tput
        rec = {"name": seg.name, "mode": seg.mode, "concurrency": seg.concurrency, "rate": round(rate, 3),
               "t_start_ns": t_start, "t_end_ns": time.time_ns(), "requests": served["n"],
               "errors": served["errors"], "throughput_rps": round(tput, 3)}
        out.append(rec)
        if on_segment is not None:
            on_segment(rec)
    return out
