"""Running `veil` commands as real child processes in tests."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class VeilProcess:
    """A `veil ...` child whose output is read line by line in the background."""

    def __init__(self, *args: str, env: dict[str, str], cwd: Path | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "veil.cli", *args],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            cwd=cwd or REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            # Its own process group, like a program started from a terminal.
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first output line matching pattern; fails with the output so far."""
        rx = re.compile(pattern)
        for line in self.lines:
            if m := rx.search(line):
                return m
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"{self.args}: no line matching {pattern!r} in {timeout}s:\n"
                    + "\n".join(self.lines)
                ) from None
            if line is None:
                raise AssertionError(
                    f"{self.args} exited ({self.proc.poll()}) before {pattern!r}:\n"
                    + "\n".join(self.lines)
                )
            self.lines.append(line)
            if m := rx.search(line):
                return m

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C, as a user would, and the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        finally:
            while True:  # collect the rest of the output for assertions
                try:
                    line = self._queue.get(timeout=2)
                except queue.Empty:
                    break
                if line is None:
                    break
                self.lines.append(line)

    def ctrl_c(self, timeout: float = 30) -> int:
        """What a terminal's Ctrl-C does: SIGINT to the whole foreground process group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        return self.interrupt(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_veil(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "veil.cli", *args],
        check=False,
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains text (to find a spawned nats-server)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found
