"""Make docs/report.png and docs/dashboard.png from one real run (README's Quick start shows them).

A tiny transformers engine under ``prism-otel run`` with a stage stall in the middle, its metrics
scraped by a real Prometheus (Debian's ``prometheus``, ``make tools``); then ``prism-otel report`` of its
spans and ``prism-otel dashboard`` of that Prometheus, each screenshotted by headless Chromium.

    python bench/screenshots.py [--out docs]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def shot(url: str, png: str, height: int) -> None:
    subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1400,{height}", "--virtual-time-budget=10000", f"--screenshot={png}", url],
                   check=True, capture_output=True, timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = ap.parse_args()
    from prism_eval.simulate import scenario
    from prism_otel import semconv as sc
    from prism_otel.cli import main as cli
    from tests import servers

    tmp = tempfile.mkdtemp(prefix="prism-shots-")
    port = servers.free_port()
    os.environ.update({sc.OTEL_METRICS_EXPORTER: "prometheus", sc.OTEL_EXPORTER_PROMETHEUS_HOST: "127.0.0.1",
                       sc.OTEL_EXPORTER_PROMETHEUS_PORT: str(port), sc.ENV_SLO_TTFT_MS: "50",
                       sc.ENV_SLO_TPOT_MS: "10", sc.ENV_INCIDENT_DIR: os.path.join(tmp, "run", "otlp")})
    with servers.prometheus(os.path.join(tmp, "prom"), [f"127.0.0.1:{port}"],
                            rule_files=[os.path.join(ROOT, "otel-config", "prometheus", "prism-rules.yml")]) as prom:
        t0 = time.time()
        s = scenario.Scenario.from_dict({
            "name": "screenshots", "engine": {"kind": "transformers", "model": "tiny", "threads": 1},
            "workload": {"arrival": "poisson", "rate": 4.0}, "warmup_s": 10, "duration_s": 40, "drain_s": 15,
            "faults": [{"fault": "stage_stall", "at_s": 15, "for_s": 10, "params": {"sleep_ms": 20}}]})
        scenario.run(s, os.path.join(tmp, "run"), log=print)
        t1 = time.time() + 2
        time.sleep(2)
        page = os.path.join(tmp, "dashboard.html")
        cli(["dashboard", "--prometheus", prom, "--start", str(t0), "--end", str(t1), "--rate-interval", "5s",
             "-o", page])
    report = os.path.join(tmp, "report.html")
    cli(["report", os.path.join(tmp, "run", "otlp"), "-o", report])
    shot("file://" + report, os.path.join(args.out, "report.png"), 2700)
    shot("file://" + page, os.path.join(args.out, "dashboard.png"), 1900)
    print(f"screenshots: {args.out}/report.png, {args.out}/dashboard.png (work files in {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
