"""Model fits in a separate, low-priority process (``python -m processors.fit_worker``).

A fit (numpy: a few hundred milliseconds on thousands of steps) holds the interpreter lock for much of
its run. On a thread of the engine
process that time comes out of the engine's steps. :class:`FitWorker` sends the rows to a worker
process started with the processor (niced, so the engine also wins the CPU; it imports the model code
before the first fit is due) and waits for the fitted
model on the fitting thread, which holds no lock while it waits. Any failure of the worker falls
back to fitting on the calling thread, counted in ``failures``; after three the worker is not
started again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from typing import Optional

from prism_otel import semconv as sc
from prism_otel._child import child_env, lower_priority, read_frame, write_frame

logger = logging.getLogger(__name__)

MAX_FAILURES = 3


def fit_model(X, y, params, weights, stage_rows, root_cause_min_z):
    """The fit itself (worker or fallback): the latency model, and the stage norms when stage rows are given."""
    import math

    from processors.model import fit
    from processors.rootcause import StageNorms

    model = fit(X, y, params, weights)
    norms = None
    if stage_rows is not None:
        expected = model.predict_many(X) * math.exp(model.center)
        norms = StageNorms.fit(stage_rows, expected, X[:, 0], root_cause_min_z)
    return model, norms


class FitWorker:
    """Engine-side handle; one request at a time (the processor fits one key at a time)."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.failures = 0
        self.remote_fits = 0
        self._wfd = self._rfd = None
        self._lock = threading.Lock()

    @property
    def usable(self) -> bool:
        return self.failures < MAX_FAILURES

    def warm(self) -> None:
        """Start the worker now (it imports the model code while the engine warms up), not at the first fit."""
        if self.usable:
            with self._lock:
                if self.proc is None:
                    try:
                        self._start()
                    except OSError:
                        self.failures += 1

    def _start(self) -> None:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "processors.fit_worker", str(req_r), str(rep_w)],
                                         pass_fds=(req_r, rep_w), env=child_env(sc.ROLE_FIT_WORKER),
                                         stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            os.close(req_w)  # this side's ends too: no worker will ever read or write them
            os.close(rep_r)
            raise
        finally:
            os.close(req_r)
            os.close(rep_w)
        self._wfd, self._rfd = req_w, rep_r

    def fit(self, X, y, params, weights, stage_rows, root_cause_min_z):
        """Fit in the worker; on any failure fit here instead (the result is the same)."""
        if self.usable:
            with self._lock:
                try:
                    if self.proc is None or self.proc.poll() is not None:
                        self.close()
                        self._start()
                    wfd, rfd = self._wfd, self._rfd
                    if wfd is None or rfd is None:  # (_start() sets both or raises)
                        raise OSError("fit worker not started")
                    write_frame(wfd, (X, y, params, weights, stage_rows, root_cause_min_z))
                    reply = read_frame(rfd)
                    if reply is None:
                        raise OSError("fit worker exited")
                    if reply[0] == "ok":
                        from processors.model import LatencyModel
                        from processors.rootcause import StageNorms

                        self.remote_fits += 1
                        model = LatencyModel.from_dict(reply[1])
                        model.fit_s = reply[3]
                        return model, (StageNorms.from_dict(reply[2]) if reply[2] is not None else None)
                    raise ValueError(reply[1])  # the fit itself failed there: it fails here too
                except ValueError:
                    raise
                except Exception:  # noqa: BLE001 - the worker is gone or unstartable: fit here
                    self.failures += 1
                    logger.debug("prism-otel: fit worker failed (%d)", self.failures, exc_info=True)
                    self.close()
        return fit_model(X, y, params, weights, stage_rows, root_cause_min_z)

    def close(self) -> None:
        for fd in (self._wfd, self._rfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wfd = self._rfd = None
        p, self.proc = self.proc, None
        if p is not None:
            try:
                p.wait(2.0)  # it exits when its request pipe closes
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(2.0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rfd, wfd = int(argv[0]), int(argv[1])
    lower_priority(19)
    import numpy  # noqa: F401 - imported before the first request arrives

    import processors.model  # noqa: F401
    import processors.rootcause  # noqa: F401

    while True:
        req = read_frame(rfd)
        if req is None:
            return 0
        try:
            model, norms = fit_model(*req)
            reply = ("ok", model.to_dict(), norms.to_dict() if norms is not None else None, model.fit_s)
        except Exception as exc:  # noqa: BLE001 - reported to the engine, which keeps its old model
            reply = ("error", f"{type(exc).__name__}: {exc}")
        write_frame(wfd, reply)


if __name__ == "__main__":
    sys.exit(main())
