"""The companion yields the CPU to the engine also where the kernel shares the CPU by session first
(sched_autogroup): a session leader sets its session group's nice, a process in someone else's session
leaves that group alone."""

import os
import subprocess
import sys

import pytest

AUTOGROUP = "/proc/self/autogroup"

pytestmark = pytest.mark.skipif(not os.path.exists(AUTOGROUP), reason="no sched_autogroup on this kernel")

PROBE = ("import sys; from prism_otel._child import lower_priority; lower_priority(7); "
         "print(open('/proc/self/autogroup').read().strip()); print(__import__('os').nice(0))")


def _run(new_session: bool) -> list:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                         start_new_session=new_session, check=True).stdout.split("\n")
    return out


def test_session_leader_lowers_its_session_group():
    group, nice = _run(True)[:2]
    assert group.endswith("nice 7"), group
    assert int(nice) >= 7


def test_process_in_another_session_leaves_the_group_alone():
    mine = open(AUTOGROUP).read().strip()
    group, nice = _run(False)[:2]
    assert group == mine, (group, mine)  # same group, its nice untouched (the caller's session)
    assert int(nice) >= 7
