"""Ctrl-C during a parallel verify(): a terminal sends SIGINT to the whole process group, the
spawned workers included. Only the verifying process may react (one line from the CLI); the
workers printed KeyboardInterrupt tracebacks, and an interrupted verify waited for them to
finish their pieces."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("_verify_sigint_child.py")

#: CPython's own report of a Ctrl-C that landed while it ran a finalizer or a weakref callback
#: written in Python (multiprocessing's _ConnectionBase.__del__, a WeakValueDictionary's remove):
#: the interrupt cannot propagate from there, so the interpreter prints this and drops it, and
#: the loop below sends another. Seen once on 3.12 and once on 3.11 in full suites; no program
#: can prevent it. Only reports whose frames are all the standard library's are left out.
LOST_IN_A_FINALIZER = re.compile(
    r"Exception ignored in: <function [\w.<>]+ at 0x[0-9a-f]+>\n"
    r"Traceback \(most recent call last\):\n"
    r"((?:  File \"[^\"]*\", line \d+, in [\w<>]+\n(?:    .*\n)?(?:\s*[\^~]+\n)?)+)"
    r"\s*KeyboardInterrupt: ?\n")
STDLIB = sysconfig.get_paths()["stdlib"]


def without_lost_interrupts(err: str) -> str:
    def drop_if_stdlib(match: re.Match[str]) -> str:
        files = re.findall(r'File "([^"]*)"', match[1])
        inside = all(f.startswith(STDLIB) and "site-packages" not in f for f in files)
        return "" if inside else match[0]

    return LOST_IN_A_FINALIZER.sub(drop_if_stdlib, err)


@pytest.mark.parametrize("delay", [0.1, 0.25, 0.4, 0.6])
def test_ctrl_c_during_a_parallel_verify_prints_no_traceback(tmp_path: Path, delay: float) -> None:
    child = subprocess.Popen(
        [sys.executable, str(CHILD), f"sqlite:///{tmp_path / 'v.db'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(delay)  # workers starting, importing or checking
    started = time.monotonic()
    for _ in range(10):
        os.killpg(child.pid, signal.SIGINT)
        try:
            _, err = child.communicate(timeout=3)
            break
        except subprocess.TimeoutExpired:
            # the Ctrl-C came while the verify was starting its workers, when this process
            # ignores it for a few milliseconds so that they do (documented): again
            continue
    else:
        child.kill()
        pytest.fail("the child did not stop on Ctrl-C")
    assert child.returncode == 130, err
    err = without_lost_interrupts(err)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert time.monotonic() - started < 30
