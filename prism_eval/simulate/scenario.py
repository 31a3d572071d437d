"""Scenarios (engine + workload + fault schedule) and running one into a labelled output directory.

A scenario is a YAML document (the library ships in ``prism_eval/simulate/scenarios/``)::

    name: cpu_contention
    description: one line on what it shows
    engine: {kind: transformers, model: small, threads: 1}   # transformers | transformers_serve | vllm
                                                             # (cpus: [0] pins the engine to those CPUs;
                                                             #  nice: -10 runs it at that nice level)
    workload: {arrival: tidal, rate: 6, tide: 0.6, period_s: 20, prompt: {median: 48}, output: {median: 24}}
    warmup_s: 30        # fault-free steps before the scored part (written to train.csv)
    duration_s: 60      # the scored part; fault times count from its start
    faults:
      - {fault: cpu_contention, at_s: 12, for_s: 8, params: {per_core: 1}}

``model`` is a directory, or a size of :mod:`prism_eval.tiny_models` (built on first use).

Output directory: ``steps.csv`` (the scored steps, in order, with the columns ``prism-otel detect``
reads), ``labels.csv`` (one row per scored step: ``anomaly``, ``fault``), ``train.csv`` (the warm-up
steps: a fault-free baseline for ``detect --train``), ``otlp/*.jsonl`` (the raw spans),
``requests.jsonl`` (the workload as served), ``engine.log`` and ``meta.json`` (scenario, injection
windows with what each injector reported, per-fault effect size and recovery, versions, machine).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from prism_eval.simulate import dataset
from prism_eval.simulate.catalog import all_faults
from prism_eval.simulate.engines import ENGINES
from prism_eval.simulate.faults import install_safety
from prism_eval.simulate.workload import WorkloadSpec

SCENARIO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenarios")
_TOP_KEYS = {"name", "description", "engine", "workload", "warmup_s", "duration_s", "faults", "drain_s"}


@dataclass
class Episode:
    fault: str
    at_s: float
    for_s: float
    params: dict = field(default_factory=dict)


@dataclass
class Scenario:
    name: str
    engine: dict
    workload: WorkloadSpec
    duration_s: float
    warmup_s: float = 30.0
    faults: list[Episode] = field(default_factory=list)
    description: str = ""
    drain_s: float = 60.0

    @classmethod
    def from_dict(cls, d: dict, where: str = "scenario") -> Scenario:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping")
        unknown = set(d) - _TOP_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
        eng = dict(d.get("engine") or {})
        if eng.get("kind", "transformers") not in ENGINES:
            raise ValueError(f"{where}.engine.kind: one of {sorted(ENGINES)}, got {eng.get('kind')!r}")
        eng.setdefault("kind", "transformers")
        eng.setdefault("model", "small")
        known = all_faults()
        eps = []
        for i, f in enumerate(d.get("faults") or []):
            w = f"{where}.faults[{i}]"
            if not isinstance(f, dict) or f.get("fault") not in known:
                got = f.get("fault") if isinstance(f, dict) else f
                raise ValueError(f"{w}.fault: one of {sorted(known)}, got {got!r}")
            extra = set(f) - {"fault", "at_s", "for_s", "params"}
            if extra:
                raise ValueError(f"{w}: unknown keys {sorted(extra)}")
            ep = Episode(f["fault"], float(f.get("at_s", 0)), float(f.get("for_s", 5)), dict(f.get("params") or {}))
            if ep.at_s < 0 or ep.for_s <= 0:
                raise ValueError(f"{w}: at_s >= 0 and for_s > 0 required")
            unknown_p = set(ep.params) - set(known[ep.fault].defaults)
            if unknown_p:
                raise ValueError(f"{w}.params: unknown {sorted(unknown_p)}; known: {sorted(known[ep.fault].defaults)}")
            eps.append(ep)
        eps.sort(key=lambda e: e.at_s)
        for a, b in zip(eps, eps[1:]):
            if b.at_s < a.at_s + a.for_s:
                raise ValueError(f"{where}.faults: {a.fault} at {a.at_s:g}s overlaps {b.fault} at {b.at_s:g}s")
        try:
            wl = WorkloadSpec.from_dict(d.get("workload") or {})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}.workload: {exc}") from exc
        sc = cls(name=str(d.get("name", "scenario")), engine=eng, workload=wl,
                 duration_s=float(d.get("duration_s", 60)),
                 warmup_s=float(d.get("warmup_s", 30)), faults=eps, description=str(d.get("description", "")),
                 drain_s=float(d.get("drain_s", 60)))
        if eps and eps[-1].at_s + eps[-1].for_s > sc.duration_s:
            raise ValueError(f"{where}.faults: the last episode ends after duration_s ({sc.duration_s:g})")
        return sc

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "engine": self.engine,
                "workload": self.workload.to_dict(), "warmup_s": self.warmup_s, "duration_s": self.duration_s,
                "drain_s": self.drain_s,
                "faults": [{"fault": e.fault, "at_s": e.at_s, "for_s": e.for_s, "params": e.params}
                           for e in self.faults]}


def load(path_or_name: str) -> Scenario:
    """A scenario file, or the name of one in the library."""
    import yaml

    path = path_or_name
    if not os.path.exists(path):
        path = os.path.join(SCENARIO_DIR, path_or_name if path_or_name.endswith(".yaml") else path_or_name + ".yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no scenario {path_or_name!r} (not a file; library: {', '.join(library())})")
    with open(path) as f:
        try:
            doc = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not YAML: {exc}") from exc
    return Scenario.from_dict(doc, where=os.path.basename(path))


def library() -> list[str]:
    return sorted(n[:-5] for n in os.listdir(SCENARIO_DIR) if n.endswith(".yaml"))


def quick(engine: str, model: str, fault: str, duration_s: float, warmup_s: float = 30.0,
          params: Optional[dict] = None, rate: Optional[float] = None) -> Scenario:
    """The ``--fault NAME --duration S`` form: two episodes of the fault (one when short)."""
    n = 2 if duration_s >= 30 else 1
    length = max(3.0, round(duration_s / (4 * n), 1))
    starts = [duration_s * 0.2, duration_s * 0.6] if n == 2 else [duration_s * 0.35]
    wl = {"rate": rate} if rate else {}
    return Scenario.from_dict({
        "name": f"{fault}-{engine}", "engine": {"kind": engine, "model": model}, "workload": wl,
        "warmup_s": warmup_s, "duration_s": duration_s,
        "faults": [{"fault": fault, "at_s": round(s, 1), "for_s": length, "params": params or {}} for s in starts]})


def _resolve_model(model: str, dtype: Optional[str] = None) -> str:
    from prism_eval import tiny_models

    if model in tiny_models.SIZES:
        if dtype and dtype != "float32":
            return tiny_models.build(tiny_models.default_dir(model) + "-" + dtype, model, dtype=dtype)
        return tiny_models.build(tiny_models.default_dir(model), model)
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model {model!r}: not a directory nor a size of prism_eval.tiny_models "
                                f"({', '.join(tiny_models.SIZES)})")
    return model


def _versions(engine: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("prism-otel", "torch", "transformers", "opentelemetry-sdk", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    out = {"host": platform.node(), "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
           "affinity": sorted(os.sched_getaffinity(0)), "loadavg": list(os.getloadavg())}
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
            out["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001 - no torch, or no usable device: a CPU machine
        pass
    return out


def _sleep_until(t_ns: int) -> None:
    while True:
        d = (t_ns - time.time_ns()) / 1e9
        if d <= 0:
            return
        time.sleep(min(d, 0.05))


def run(sc: Scenario, out_dir: str, log=print) -> dict:
    """Run ``sc`` and write its labelled output under ``out_dir``; returns the meta document."""
    install_safety()
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    os.makedirs(os.path.join(out_dir, "otlp"), exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    model = _resolve_model(sc.engine["model"], sc.engine.get("dtype"))
    eng = ENGINES[sc.engine["kind"]](model, out_dir, {k: v for k, v in sc.engine.items()
                                                      if k not in ("kind", "model", "cpus", "nice")})
    arrivals = sc.workload.arrivals(sc.warmup_s + sc.duration_s)
    meta = {"scenario": sc.to_dict(), "model_dir": model, "versions": _versions(sc.engine["kind"]),
            "machine": _machine(), "requests": len(arrivals), "windows": []}
    fault_classes = all_faults()
    faults = []
    log(f"simulate: {sc.name}: {sc.engine['kind']} engine, {len(arrivals)} requests over "
        f"{sc.warmup_s:g}+{sc.duration_s:g} s, {len(sc.faults)} fault episodes")
    try:
        mine, my_nice = os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0)
        try:
            # the engine (and its children) pinned, or at another nice level: they inherit ours
            if sc.engine.get("cpus"):
                os.sched_setaffinity(0, {int(c) for c in sc.engine["cpus"]})
            if "nice" in sc.engine:
                os.setpriority(os.PRIO_PROCESS, 0, int(sc.engine["nice"]))
            eng.start(arrivals, lead_s=2.0, drain_s=sc.drain_s)
        finally:
            os.sched_setaffinity(0, mine)
            if os.getpriority(os.PRIO_PROCESS, 0) != my_nice:
                os.setpriority(os.PRIO_PROCESS, 0, my_nice)
        t0 = eng.wait_ready()
        target = eng.target()
        meta["target"] = {"pids": target.pids, "step_pid": target.step_pid, "cpus": target.cpus()}
        for ep in sc.faults:
            f = fault_classes[ep.fault](target, ep.params, max_s=ep.for_s + 30)
            f.prepare()
            faults.append(f)
        base = t0 + int(sc.warmup_s * 1e9)
        for ep, f in zip(sc.faults, faults):
            _sleep_until(base + int(ep.at_s * 1e9))
            t_start = f.start()
            log(f"simulate: {ep.fault} on at {(t_start - base) / 1e9:.2f} s")
            _sleep_until(t_start + int(ep.for_s * 1e9))
            t_end = f.stop()
            log(f"simulate: {ep.fault} off at {(t_end - base) / 1e9:.2f} s")
            meta["windows"].append({"fault": ep.fault, "t_start": t_start, "t_end": t_end, "params": f.params,
                                    "info": f.info})
        _sleep_until(base + int(sc.duration_s * 1e9))
        eng.finish(timeout=sc.drain_s + 120)
    finally:
        for f in faults:
            f.close()
        eng.close()
    meta["machine"]["loadavg_end"] = list(os.getloadavg())
    meta.update(t0_ns=t0, scored_from_ns=base, scored_until_ns=base + int(sc.duration_s * 1e9))
    meta.update(write_dataset(out_dir, meta))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    return meta


def write_dataset(out_dir: str, meta: dict) -> dict:
    """Spans -> steps.csv, labels.csv, train.csv; effect and recovery per fault."""
    spans = dataset.read_spans(dataset.otlp_files(os.path.join(out_dir, "otlp")))
    rows = dataset.steps_from_spans(spans)
    if not rows:
        raise RuntimeError(f"no prism.step spans under {out_dir}/otlp: the engine did not run under prism-otel? "
                           f"(see {out_dir}/engine.log)")
    lo, hi = meta["scored_from_ns"], meta["scored_until_ns"]
    train = [r for r in rows if r["start_ns"] < lo]
    scored = [r for r in rows if r["start_ns"] >= lo]
    labels = dataset.label(scored, meta["windows"])
    first = min((w["t_start"] for w in meta["windows"]), default=None)
    baseline = train + [r for r in scored if first is None or r["end_ns"] < first]
    settled = dataset.recovery_periods(scored, labels, meta["windows"], baseline)
    dataset.write_csv(os.path.join(out_dir, "steps.csv"), scored, dataset.STEP_COLUMNS)
    dataset.write_csv(os.path.join(out_dir, "train.csv"), train, dataset.STEP_COLUMNS)
    dataset.write_csv(os.path.join(out_dir, "labels.csv"), labels, dataset.LABEL_COLUMNS)
    effects = {}
    for name in dict.fromkeys(w["fault"] for w in meta["windows"]):
        effects[name] = dataset.effect(scored, labels, name)
    recovery = [dataset.recovery(scored, labels, w) for w in meta["windows"]]
    return {"steps": {"train": len(train), "scored": len(scored), "anomalous": sum(lb["anomaly"] for lb in labels),
                      "after_scored": sum(1 for r in scored if r["start_ns"] >= hi),
                      "set_aside": sum(1 for lb in labels if not lb["scored"])},
            "effects": effects, "recovery": recovery, "settled": settled}


def copy_library(dest: str) -> list[str]:
    os.makedirs(dest, exist_ok=True)
    out = []
    for n in library():
        shutil.copy(os.path.join(SCENARIO_DIR, n + ".yaml"), dest)
        out.append(os.path.join(dest, n + ".yaml"))
    return out


def main_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
