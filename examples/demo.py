"""The demo (``make demo``, about a minute): a tiny engine under load, a real fault halfway, one incident.

1. Starts examples/serving_loop.py under ``prism-otel run`` (a tiny continuous-batching engine, fed
   4 requests a second): the detector learns what each step should cost from the first few hundred
   steps and judges every step after that, within seconds.
2. Halfway, injects a real fault into the running engine with prism-otel's simulation toolkit
   (prism_eval/simulate/faults.py): a stage stall, the ``update`` stage of every step sleeping 20 ms
   (a lock wait or a blocking call in the engine), patched live into the process; it is undone 10 s later.
3. prism-otel prints the incident when it opens and when it closes, with its root cause; at exit, the
   per-stage summary: steps judged and not judged, and the incidents.
4. Writes the HTML report of the run (``prism-otel report``) and prints its path.

Run from any directory (it writes ./prism-out and ./prism-report.html there)::

    python examples/demo.py [--duration 40] [--fault stage_stall|cpu_throttle]
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"\033[1mdemo:\033[0m {msg}" if sys.stdout.isatty() else f"demo: {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of traffic")
    ap.add_argument("--fault", default="stage_stall", choices=("stage_stall", "cpu_throttle"))
    ap.add_argument("--fault-s", type=float, default=10.0, help="how long the fault lasts")
    args = ap.parse_args()

    from prism_eval.simulate import engines, faults

    out_dir = os.path.abspath("prism-out")
    ready = os.path.abspath(".demo-ready.json")
    if os.path.exists(ready):
        os.remove(ready)
    env = dict(os.environ)
    env.setdefault("PRISM_OTEL_OUT_DIR", out_dir)
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "prism_otel.cli", "run", "--", sys.executable, os.path.join(HERE, "serving_loop.py"),
           "--duration", str(args.duration), "--rate", "4", "--every", "10", "--ready", ready]
    _say(f"starting a tiny continuous-batching engine under prism-otel for {args.duration:g} s of traffic")
    engine = subprocess.Popen(cmd, env=env)
    fault = None
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(ready):
            if engine.poll() is not None:
                _say(f"the engine exited with {engine.returncode} before it served")
                return 1
            if time.monotonic() > deadline:
                raise TimeoutError("engine not ready after 300 s")
            time.sleep(0.2)
        with open(ready) as f:
            pid = json.load(f)["pid"]
        t0 = time.monotonic()
        _say(f"engine pid {pid} is serving; the detector learns its normal steps and judges every step after that")
        at = max(5.0, args.duration / 2 - args.fault_s / 2)
        time.sleep(at)
        target = faults.Target(pids=[pid], step_pid=pid, engine="transformers", scratch_dir=os.getcwd(),
                               stage_targets=dict(engines.TRANSFORMERS_STAGES))
        params = {"stage": "update", "sleep_ms": 20.0} if args.fault == "stage_stall" else {"run_fraction": 0.4}
        try:
            fault = faults.CPU_FAULTS[args.fault](target, params, max_s=args.fault_s + 30)
            fault.prepare()
            fault.start()
        except Exception as exc:  # noqa: BLE001 - e.g. ptrace not allowed: fall back to a fault from outside
            if args.fault == "cpu_throttle":
                raise
            _say(f"stage stall not possible here ({exc}); throttling the engine's CPU instead")
            fault = faults.CpuThrottle(target, {"run_fraction": 0.4}, max_s=args.fault_s + 30)
            fault.prepare()
            fault.start()
        _say(f"t+{time.monotonic() - t0:.0f} s: injected a real fault, {fault.name}: {fault.summary}")
        time.sleep(args.fault_s)
        fault.stop()
        _say(f"t+{time.monotonic() - t0:.0f} s: fault removed; the incident closes once the steps are normal again")
        fault = None
        engine.wait()
    finally:
        if fault is not None:
            fault.close()
        if engine.poll() is None:
            engine.terminate()
            engine.wait(30)
        if os.path.exists(ready):
            os.remove(ready)
    report = os.path.abspath("prism-report.html")
    rc = subprocess.call([sys.executable, "-m", "prism_otel.cli", "report", out_dir, "-o", report], env=env)
    if rc == 0:
        _say(f"the HTML report of this run: {report}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
