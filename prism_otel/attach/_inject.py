"""Getting the stub to run in the target: ``sys.remote_exec`` (3.14+) or pyinjector + our shim.

Files (all under the attacher's work dir, ``$PRISM_OTEL_ATTACH_DIR`` or ``$TMPDIR/prism-otel-attach-UID``,
mode 0755, owned by the attacher, checked not to be someone else's):

* ``shim-<hash>.so``: the shim below, compiled once with the system C compiler (it needs no
  Python headers: every CPython symbol is looked up with ``dlsym`` at run time, so one build
  serves every Python version, and a process without those symbols is left alone).
* ``req-<pid>.py``: the stub for the next request to that process (the shim finds it from its
  own path and ``getpid()``), or ``req-<pid>-<id>.py`` for ``sys.remote_exec``.
* ``op-<id>/``: per request, owned by the target's user, mode 0700: ``request.json`` (may hold
  exporter credentials; the target deletes it once read) and ``status.json`` (the handshake).

The shim is linked ``-z nodelete``: once loaded it stays, so every later request re-uses the same
mapping (``dlopen`` of a loaded library returns its handle; no new mapping per attach), and the
injector may ``dlclose`` right away without unmapping code a thread still runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.attach._stub import render
from prism_otel.attach._target import Refused, Target

TRIGGER = "prism_otel_trigger"

SHIM_C = r"""
/* prism-otel attach shim. prism_otel_trigger() is called by the injector on a hijacked thread of
   the target; it only starts a detached thread and returns. That thread reads <shim dir>/req-<pid>.py
   and runs it under PyGILState_Ensure, i.e. as an ordinary foreign thread that waits for the GIL
   like any other: Python code never runs on the hijacked thread. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int (*int_fn)(void);
typedef void (*release_fn)(int);
typedef int (*run_fn)(const char *);

void prism_otel_trigger(void);

static void *prism_otel_worker(void *unused) {
    (void)unused;
    Dl_info info;
    char path[4352];
    if (!dladdr((void *)prism_otel_trigger, &info) || !info.dli_fname) return NULL;
    const char *slash = strrchr(info.dli_fname, '/');
    if (!slash || (size_t)(slash - info.dli_fname) > 4096) return NULL;
    snprintf(path, sizeof path, "%.*s/req-%d.py", (int)(slash - info.dli_fname), info.dli_fname, (int)getpid());
    int_fn is_init = (int_fn)dlsym(RTLD_DEFAULT, "Py_IsInitialized");
    int_fn ensure = (int_fn)dlsym(RTLD_DEFAULT, "PyGILState_Ensure");
    release_fn release = (release_fn)dlsym(RTLD_DEFAULT, "PyGILState_Release");
    run_fn run = (run_fn)dlsym(RTLD_DEFAULT, "PyRun_SimpleString");
    if (!is_init || !ensure || !release || !run || !is_init()) return NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *code = malloc(65537);
    if (code) {
        size_t n = fread(code, 1, 65536, f);
        code[n] = 0;
    }
    fclose(f);
    if (!code) return NULL;
    int st = ensure();
    run(code);
    release(st);
    free(code);
    return NULL;
}

void prism_otel_trigger(void) {
    int saved = errno;
    pthread_t t;
    pthread_attr_t a;
    if (pthread_attr_init(&a) == 0) {
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        pthread_create(&t, &a, prism_otel_worker, NULL);
        pthread_attr_destroy(&a);
    }
    errno = saved;
}
"""


class InjectError(Exception):
    """The injector itself failed (the target was touched, or tried to be; the message says)."""


def work_dir() -> str:
    d = os.environ.get(sc.ENV_ATTACH_DIR) or os.path.join(tempfile.gettempdir(), f"prism-otel-attach-{os.geteuid()}")
    os.makedirs(d, mode=0o755, exist_ok=True)
    st = os.lstat(d)
    if not os.path.isdir(d) or os.path.islink(d) or st.st_uid != os.geteuid():
        raise Refused(f"attach work dir {d} is not a directory owned by us (uid {os.geteuid()}); "
                      f"set {sc.ENV_ATTACH_DIR} to one that is")
    os.chmod(d, 0o755)  # the target (maybe another user) must read the shim and the stub
    return d


def shim_path(d: str) -> str:
    """Build the shim once (content- and machine-keyed); needs a C compiler the first time."""
    key = hashlib.sha256((SHIM_C + platform.machine()).encode()).hexdigest()[:16]
    out = os.path.join(d, f"shim-{key}.so")
    if os.path.isfile(out):
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise Refused("prism-otel attach builds a 3 KB injection shim once and needs a C compiler for it "
                      "(cc, gcc or clang; none found). Install one, or attach from a Python 3.14+ environment "
                      "to a 3.14+ target (sys.remote_exec needs no shim)")
    src = os.path.join(d, f"shim-{key}.c")
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(src, "w") as f:
        f.write(SHIM_C)
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wl,-z,nodelete", "-o", tmp, src, "-lpthread", "-ldl"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise Refused(f"building the injection shim failed ({' '.join(cmd)}):\n{p.stderr.strip()}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    return out


class Request:
    """One request to one target: writes the files, triggers the stub, waits for the handshake."""

    def __init__(self, t: Target, action: str, env: dict, paths=(), stop_timeout: float = 10.0) -> None:
        self.t = t
        self.id = uuid.uuid4().hex[:12]
        self.dir = work_dir()
        self.op = os.path.join(self.dir, f"op-{self.id}")
        os.mkdir(self.op, 0o700)
        self.request_path = os.path.join(self.op, "request.json")
        self.status_path = os.path.join(self.op, "status.json")
        req = {"id": self.id, "action": action, "env": env, "paths": list(paths), "status_path": self.status_path,
               "stop_timeout": stop_timeout, "env_prefixes": [sc.OTEL_ENV_PREFIX, sc.ENV_PREFIX]}
        fd = os.open(self.request_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(req, f)
        if t.uid != os.geteuid():  # root attaching to another user's process: hand the files over
            try:
                os.chown(self.request_path, t.uid, -1)
                os.chown(self.op, t.uid, -1)
            except PermissionError as exc:
                shutil.rmtree(self.op, ignore_errors=True)
                raise Refused(f"cannot hand the request files to uid {t.uid} (process {t.pid}): {exc.strerror}; "
                              "attach as root or as that user") from exc
        self.method = "remote_exec" if t.version >= (3, 14) else "pyinjector"
        self.stub_path = os.path.join(self.dir, f"req-{t.pid}-{self.id}.py" if self.method == "remote_exec"
                                      else f"req-{t.pid}.py")
        self.inject_s = None

    def trigger(self) -> None:
        tmp = f"{self.stub_path}.{self.id}.tmp"
        with open(tmp, "w") as f:
            f.write(render(self.request_path))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.stub_path)
        t0 = time.perf_counter()
        if self.method == "remote_exec":
            self._remote_exec()
        else:
            self._pyinjector()
        self.inject_s = time.perf_counter() - t0

    def _remote_exec(self) -> None:
        pid = self.t.pid
        remote_exec = getattr(sys, "remote_exec", None)  # Python 3.14+
        if sys.version_info[:2] == self.t.version and remote_exec is not None:
            try:
                remote_exec(pid, self.stub_path)
            except (OSError, RuntimeError, ValueError) as exc:
                raise InjectError(f"sys.remote_exec({pid}) failed: {exc}") from exc
            return
        # Versions must match in major.minor: let the target's own interpreter make the call.
        code = "import sys; sys.remote_exec(int(sys.argv[1]), sys.argv[2])"
        p = subprocess.run([self.t.exe, "-I", "-S", "-c", code, str(pid), self.stub_path],
                           capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise InjectError(f"sys.remote_exec({pid}) via {self.t.exe} failed: {p.stderr.strip()[-2000:]}")

    def _pyinjector(self) -> None:
        try:
            from pyinjector.api import InjectorError, attach
        except ImportError as exc:
            raise Refused(f"attaching to Python {self.t.version_str} needs pyinjector: "
                          f"pip install 'prism-otel[attach]' ({exc})") from exc
        shim = shim_path(self.dir)
        try:
            with attach(self.t.pid) as inj:
                handle = inj.inject(shim.encode())
                try:
                    inj.call(handle, TRIGGER)
                finally:
                    try:
                        inj.uninject(handle)  # the shim is -z nodelete: this only drops the reference
                    except InjectorError:
                        pass  # a reference left on a nodelete library changes nothing
        except InjectorError as exc:
            raise InjectError(f"pyinjector failed on process {self.t.pid}: {exc}") from exc

    def wait(self, timeout: float) -> Optional[dict]:
        """The handshake document, or None if none came within ``timeout``."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            try:
                with open(self.status_path) as f:
                    return json.load(f)
            except FileNotFoundError:
                pass
            except ValueError:  # written atomically, so a parse error is a real problem
                return {"ok": False, "error": f"unreadable handshake file {self.status_path}"}
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.002 if time.monotonic() - start < 1.0 else 0.02)  # a stat() per poll: cheap

    def cleanup(self, answered: bool) -> None:
        """Remove this request's files; a stub not yet run (no answer) is left for the target."""
        if answered:
            for p in (self.request_path, self.status_path, self.stub_path):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            try:
                os.rmdir(self.op)
            except OSError:
                pass
