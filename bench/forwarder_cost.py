"""Where the companion forwarder's CPU goes per wake-up (issues 2 and 8): its functions timed in place.

    .venv/bin/python bench/forwarder_cost.py --smoke     # CPU, the tiny model (what docs/benchmarks.md quotes)
    .venv/bin/python bench/forwarder_cost.py --pacing    # the forwarder's CPU by pacing, and a timed wait's cost

Runs gpu_validate's engines (continuous batching, then generate) under the companion pipeline with
the forwarder's record conversion, pickling and pipe write wrapped in per-thread CPU clocks, and
prints the cost per wake-up. Without --smoke it targets the GPU machine; its one call there
(2026-11-24) printed nothing within 300 s, which is not understood yet.
"""
import argparse
import os
import pickle
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import gpu_validate as gv  # noqa: E402
from prism_otel import _child, companion  # noqa: E402

T = {"portable": 0, "pickle": 0, "write": 0, "wakes": 0, "records": 0, "frames": 0, "bytes": 0}
tt = time.thread_time_ns


def _install() -> None:
    orig_portable, orig_send = companion._portable, companion.Forwarder._send_pending

    def portable(rec, wait=True):
        c = tt()
        r = orig_portable(rec, wait)
        T["portable"] += tt() - c
        T["records"] += 1
        return r

    def write_frame(fd, obj):
        c = tt()
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        c2 = tt()
        view = memoryview(_child._HDR.pack(len(data)) + data)
        while view:
            view = view[os.write(fd, view):]
        T["pickle"] += c2 - c
        T["write"] += tt() - c2
        T["frames"] += 1
        T["bytes"] += len(data)

    def send(self, final=False):
        T["wakes"] += 1
        return orig_send(self, final)

    companion._portable, companion._write_frame, companion.Forwarder._send_pending = portable, write_frame, send


def wait_cost() -> None:
    """CPU of one timed wake-up of a thread, by how it sleeps (the floor under any polling thread)."""
    import threading

    print("| a thread sleeping in a loop | CPU per wake-up |")
    print("|---|---|")
    for label, fn in (("threading.Event().wait(0.05)", lambda ev: ev.wait(0.05)),
                      ("threading.Event().wait(0.02)", lambda ev: ev.wait(0.02)),
                      ("threading.Event().wait(0.005)", lambda ev: ev.wait(0.005)),
                      ("time.sleep(0.02)", lambda ev: time.sleep(0.02))):
        out = []

        def run():
            ev = threading.Event()
            c = tt()
            for _ in range(100):
                fn(ev)
            out.append((tt() - c) / 100 / 1e3)

        t = threading.Thread(target=run)
        t.start()
        t.join()
        print(f"| {label} | {out[0]:.1f} µs |")


def pacing() -> None:
    """The 19 M-parameter CB engine of bench/cb_interleaved.py under the companion: the forwarder
    thread's CPU over wall time for each pacing (busy min-max s), then 5 s idle at the old and new idle
    sleeps."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    import prism_otel
    from _cb_load import serve, workload
    from prism_otel import tiny_models

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_models.build(tiny_models.default_dir("small"), "small")).eval()
    os.environ["PRISM_OTEL_PIPELINE"] = "companion"
    st = prism_otel.start()
    mgr = model.init_continuous_batching(
        generation_config=GenerationConfig(max_new_tokens=64, do_sample=False, eos_token_id=-1, pad_token_id=2),
        continuous_batching_config=tiny_models.cb_config(num_blocks=256, page_size=32, max_batch_tokens=512))
    mgr.start()
    fw = st.pipeline
    p = fw.pacer

    def cpu():
        return time.clock_gettime_ns(time.pthread_getcpuclockid(fw._thread.ident))

    serve(mgr, workload(1, 64), 16)
    print("| forwarder pacing | wall | forwarder thread CPU / wall |")
    print("|---|---|---|")
    for lo, hi, per in ((0.005, 0.02, 1.0), (0.02, 0.02, 1.0), (0.02, 0.05, 2.0), (0.1, 0.1, 1.0)):
        p.busy_min_s, p.busy_max_s, p.steps_per_wake = lo, hi, per
        c0 = cpu()
        _, dt = serve(mgr, workload(2, 64), 16)
        print(f"| {lo * 1e3:.0f}-{hi * 1e3:.0f} ms, {per:.0f} step(s) per wake-up | {dt:.2f} s | "
              f"{100 * (cpu() - c0) / 1e9 / dt:.2f}% |", flush=True)
    for idle in (0.05, 0.25):
        p.idle_s = idle
        time.sleep(1.5)
        c0 = cpu()
        time.sleep(5)
        print(f"| idle, sleeping {idle * 1e3:.0f} ms | 5 s | {(cpu() - c0) / 1e6:.1f} ms of CPU |", flush=True)
    mgr.stop(block=True, timeout=60)
    prism_otel.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--pacing", action="store_true")
    a = ap.parse_args()
    if a.pacing:
        os.environ.setdefault("PRISM_OTEL_SUMMARY", "0")
        os.environ.setdefault("OTEL_TRACES_EXPORTER", "none")
        wait_cost()
        pacing()
        return
    os.environ.setdefault("PRISM_OTEL_SUMMARY", "0")
    os.environ.setdefault("OTEL_TRACES_EXPORTER", "none")
    _install()
    E = gv.Env(a)
    rt = gv.start_prism(mode="companion")
    fw = rt.pipeline
    srv = gv.CBServer(E)
    work = gv.cb_work(E, 8 if a.smoke else 48, 1, new=(24, 32))
    ids = E.prompts(2 if a.smoke else 32, 16 if a.smoke else 256)
    srv.run(work)
    E.generate(ids, 4)

    def cpu():
        return time.clock_gettime_ns(time.pthread_getcpuclockid(fw._thread.ident))

    print("| engine | wall | wake-ups / frames / records | bytes per frame | per wake-up: thread CPU, inside the loop, "
          "record conversion, pickle, pipe write (µs) |")
    print("|---|---|---|---|---|")
    for name, fn in (("CB 48 requests x3", lambda: [srv.run(work) for _ in range(3)]),
                     ("generate x10", lambda: [E.generate(ids, 16) for _ in range(10)])):
        fw.flush()
        time.sleep(0.3)
        for k in T:
            T[k] = 0
        c0, i0, w0 = cpu(), fw.cpu_ns, time.perf_counter()
        fn()
        fw.flush()
        time.sleep(0.3)
        tot, inner, wall = cpu() - c0, fw.cpu_ns - i0, time.perf_counter() - w0
        w = max(1, T["wakes"])
        print(f"| {name} | {wall:.2f} s | {T['wakes']} / {T['frames']} / {T['records']} | "
              f"{T['bytes'] / max(1, T['frames']):.0f} | {tot / w / 1e3:.1f}, {inner / w / 1e3:.1f}, "
              f"{T['portable'] / w / 1e3:.1f}, {T['pickle'] / w / 1e3:.1f}, {T['write'] / w / 1e3:.1f} |", flush=True)
    srv.stop()
    gv.stop_prism()


if __name__ == "__main__":
    main()
