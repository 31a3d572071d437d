"""What attach refuses before touching the target, and the targets it reaches with help (--path,
another user's process when we may trace it). Each refusal: clear message, exit code 2, the target
alive and never touched (no shim in its memory map)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from prism_otel import semconv as sc
from tests.attach.conftest import ROOT, SYSTEM_PY, clean_env, prism, readable_site, sink_env

PYENV = os.path.expanduser("~/.pyenv/versions")
VENV_SITE = os.path.join(os.path.dirname(os.path.dirname(sys.executable)), "lib",
                         f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
NOBODY = pwd.getpwnam("nobody").pw_uid if "nobody" in {e.pw_name for e in pwd.getpwall()} else 65534
LOOP = "import sys, time\nprint('ready', flush=True)\nwhile True:\n    time.sleep(0.02)\n"


def pyenv(version: str) -> str:
    major_minor = ".".join(version.split(".")[:2])
    for d in sorted(os.listdir(PYENV)) if os.path.isdir(PYENV) else []:
        if d.startswith(version):
            return os.path.join(PYENV, d, "bin", f"python{major_minor}")
    pytest.skip(f"no Python {version} under {PYENV}")


def start(cmd, user=None, env=None):
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--inh-caps=-all", *cmd]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/tmp",
                         env=env if env is not None else clean_env())
    if cmd[-2:] != ["sleep", "60"]:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    else:
        time.sleep(0.2)
    return p


def untouched(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "/shim-" not in f.read()


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        p.kill()
        p.wait(10)


def test_sleep_is_refused_and_survives(procs):
    p = start(["sleep", "60"])
    procs.append(p)
    r = prism("attach", p.pid)
    assert r.returncode == 2
    assert "not a Python process" in r.stderr and "would kill it" in r.stderr
    assert p.poll() is None and untouched(p.pid)
    r = prism("attach", p.pid, "--tree")
    assert r.returncode == 2 and p.poll() is None


def test_other_users_process_without_permission_is_refused(procs):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the attacher as nobody")
    p = start([SYSTEM_PY, "-c", LOOP])  # ours (root); the attacher runs as nobody, no capabilities
    procs.append(p)
    env = clean_env()
    env.pop(sc.ENV_ATTACH_DIR, None)
    r = prism("attach", p.pid, env=env, user=NOBODY)
    assert r.returncode == 2, r.stderr
    assert "permission denied" in r.stderr and "CAP_SYS_PTRACE" in r.stderr
    assert p.poll() is None and untouched(p.pid)


def test_unsupported_python_version_is_refused(procs):
    p = start([pyenv("3.8"), "-c", LOOP])
    procs.append(p)
    r = prism("attach", p.pid)
    assert r.returncode == 2 and "Python 3.8" in r.stderr and "3.9 or newer" in r.stderr
    assert p.poll() is None and untouched(p.pid)


@pytest.mark.parametrize("version", ["3.9", "3.12", "3.13"])
def test_target_that_cannot_import_prism_otel(procs, version):
    p = start([pyenv(version), "-c", LOOP])
    procs.append(p)
    r = prism("attach", p.pid)
    assert r.returncode == 2, r.stderr
    assert "cannot import" in r.stderr and "prism_otel" in r.stderr and "--path" in r.stderr
    assert untouched(p.pid)
    # Skipping the probe, the injection happens and the handshake brings the target's import error back.
    r = prism("attach", p.pid, "--no-probe", "--timeout", "30")
    assert r.returncode == 1, r.stderr
    assert "cannot import prism_otel in the target" in r.stderr
    assert p.poll() is None
    # status on a process without prism-otel loads nothing into it
    r = prism("status", p.pid, "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["loaded"] is False and doc["python"].startswith(version + ".")


def test_path_makes_a_bare_interpreter_attachable_and_detach_removes_it(procs, sink):
    if not os.path.exists(SYSTEM_PY):
        pytest.skip("no system python3")
    p = start([SYSTEM_PY, "-c", LOOP])
    procs.append(p)
    r = prism("attach", p.pid, env=sink_env(sink))
    assert r.returncode == 2 and "cannot import" in r.stderr
    r = prism("attach", p.pid, "--path", VENV_SITE, "--path", ROOT, "--json", env=sink_env(sink))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)[0]
    assert doc["running"] and doc["sys_path_added"] == [VENV_SITE, ROOT]
    r = prism("detach", p.pid, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)[0]
    assert not doc["running"] and doc["sys_path_removed"] == sorted([VENV_SITE, ROOT])
    assert p.poll() is None


def test_root_attaches_to_another_users_process(procs, sink, monkeypatch):
    """We may trace it (root): the request and handshake files are handed to the target's user. The
    import probe runs as that user: a directory it cannot read is refused before anything is injected."""
    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PY) or shutil.which("setpriv") is None:
        pytest.skip("needs root, setpriv and a system python3")
    d = tempfile.mkdtemp(prefix="prism-attach-test-")  # under /tmp: the target's user must reach it
    monkeypatch.setenv(sc.ENV_ATTACH_DIR, d)
    try:
        p = start([SYSTEM_PY, "-c", LOOP], user=NOBODY)
        procs.append(p)
        env = sink_env(sink)
        env[sc.ENV_ATTACH_DIR] = d
        unreadable = tempfile.mkdtemp(prefix="prism-attach-private-")  # mode 0700: only root reads it
        try:
            private = os.path.join(unreadable, "site")  # everything it needs, but behind a 0700 directory
            shutil.copytree(readable_site(), private)
            r = prism("attach", p.pid, "--path", private, env=env)
        finally:
            shutil.rmtree(unreadable, ignore_errors=True)
        assert r.returncode == 2, r.stderr
        assert "cannot import" in r.stderr and f"uid {NOBODY}" in r.stderr, r.stderr
        assert untouched(p.pid)
        r = prism("attach", p.pid, "--path", readable_site(), "--json", env=env)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)[0]
        assert doc["running"] and doc["pid"] == p.pid
        r = prism("detach", p.pid, env=env)
        assert r.returncode == 0, r.stderr
        assert p.poll() is None
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_shim_alone_leaves_a_non_python_process_alone(procs):
    """Second line of defence behind the refusal: the shim looks CPython up with dlsym and does
    nothing where it is absent (a library with plain undefined Py* symbols kills such a process)."""
    pyinjector = pytest.importorskip("pyinjector.api")
    from prism_otel.attach import _inject

    p = start(["sleep", "60"])
    procs.append(p)
    shim = _inject.shim_path(_inject.work_dir())
    with pyinjector.attach(p.pid) as inj:
        handle = inj.inject(shim.encode())
        inj.call(handle, _inject.TRIGGER)
    time.sleep(0.3)
    assert p.poll() is None and not untouched(p.pid)


def test_call_names_only_functions_of_our_packages():
    from prism_otel.attach import agent

    doc = agent.run({"action": "call", "call": {"target": "os:getcwd"}}, [], {})
    assert not doc["ok"] and "expected 'prism_otel.<module>:<function>'" in doc["error"]
    doc = agent.run({"action": "call", "call": {"target": "prism_otel.semconv:kernel_span_name",
                                                "kwargs": {"group": "gemm"}}}, [], {})
    assert doc["ok"] and doc["result"] == sc.kernel_span_name("gemm"), doc.get("traceback")
    # the simulation toolkit's in-process faults live in prism_eval (prism_eval.simulate.inproc)
    doc = agent.run({"action": "call", "call": {"target": "prism_eval.simulate.catalog:expected_cause",
                                                "kwargs": {"fault": "gc_storm"}}}, [], {})
    assert doc["ok"] and doc["result"] == "gc", doc.get("traceback")
