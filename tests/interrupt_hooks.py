"""Hooks that count a function's calls and raise at one of them: a run killed at that point."""

import pathlib
import signal
import subprocess
import time


class Interrupted(Exception):
    """What a hook raises: stands for the process being killed at that point."""


class Hook:
    """Counts the calls of function `name` of `module`; raises `Interrupted` at call `fail_at`."""

    def __init__(self, monkeypatch, module, name: str, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at
        real = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                raise Interrupted(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    def reset(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at


def kill_when_hanging(command: list[str], work: pathlib.Path, env: dict) -> None:
    """Runs `command` until it creates `work/"hanging"` (a hook sleeping there), then SIGKILLs it.

    Fails if the process ends before, or never gets there within two minutes.
    """
    job = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (work / "hanging").exists():
            assert job.poll() is None, job.stderr.read().decode()
            assert time.monotonic() < deadline, "the job never reached the hook"
            time.sleep(0.05)
        job.send_signal(signal.SIGKILL)
    finally:
        job.wait()
    assert job.returncode == -signal.SIGKILL
