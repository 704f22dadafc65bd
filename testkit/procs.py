"""Child processes for the tests and the benchmarks, started, read and stopped one way.

`Child` is any command (a fake upstream, a bench helper); `VeilProcess` a `veil ...` command;
`nats_server` an embedded-style nats-server for code that talks to NATS directly.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Self, cast

from veil.natsserver import NatsServer

__all__ = [
    "REPO",
    "Child",
    "VeilProcess",
    "nats_server",
    "processes_mentioning",
    "run_veil",
]

REPO = Path(__file__).resolve().parent.parent


class Child:
    """A child process whose output a thread reads line by line (a full pipe would block it).

    stdout, and stderr too unless `stderr` says otherwise (a file, or subprocess.DEVNULL),
    is read in the background: `wait_for` finds a line, `lines` holds what was read so far.
    With `stdin=True` the child gets a pipe that `finish` closes. With `new_session` (the
    default) it runs in its own process group, like a program started from a terminal, so
    a Ctrl-C reaches the caller only, which stops it.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stderr: Path | int = subprocess.STDOUT,
        stdin: bool = False,
        new_session: bool = True,
    ) -> None:
        self.name = name or " ".join(cmd)
        self.stderr_path = stderr if isinstance(stderr, Path) else None
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        err_file = stderr.open("wb") if isinstance(stderr, Path) else None
        err: int | IO[bytes] = err_file if err_file is not None else cast(int, stderr)
        try:
            self.proc = subprocess.Popen(
                list(cmd),
                cwd=cwd or REPO,
                env=dict(env) if env is not None else None,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=new_session,
            )
        finally:
            if err_file is not None:
                err_file.close()  # the child has its own copy
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30) -> re.Match[str]:
        """The first output line matching pattern; fails with the output so far."""
        rx = re.compile(pattern)
        for seen in self.lines:
            if m := rx.search(seen):
                return m
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"{self.name}: no line matching {rx.pattern!r} in {timeout}s:\n"
                    + "\n".join(self.lines)
                ) from None
            if line is None:
                self._queue.put(None)  # a later wait fails at once too
                raise AssertionError(
                    f"{self.name} exited ({self.proc.poll()}) before {rx.pattern!r}:\n"
                    + "\n".join(self.lines)
                )
            self.lines.append(line)
            if m := rx.search(line):
                return m

    def read_line(self, timeout: float = 30) -> str:
        """The next output line not read yet; fails at the end of the output, or when none
        comes in timeout seconds."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no output line in {timeout}s") from None
        if line is None:
            self._queue.put(None)
            raise AssertionError(f"{self.name} exited ({self.proc.poll()}), no more output")
        self.lines.append(line)
        return line

    def send(self, text: str) -> None:
        """Write text to its stdin (`stdin=True`) at once."""
        assert self.proc.stdin is not None, f"{self.name} was started without stdin=True"
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def _collect_rest(self) -> None:
        """The output not read yet, into `lines` (after the child ended)."""
        while True:
            try:
                line = self._queue.get(timeout=2)
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)
                break
            self.lines.append(line)

    def stderr_lines(self) -> list[str]:
        """What the child wrote to its stderr file (when given one)."""
        if self.stderr_path is None:
            return []
        return self.stderr_path.read_text(errors="replace").splitlines()

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C, as a user would, and the exit code (TimeoutExpired if it goes on)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        finally:
            self._collect_rest()  # the rest of the output, for assertions

    def ctrl_c(self, timeout: float = 30) -> int:
        """What a terminal's Ctrl-C does: SIGINT to the whole foreground process group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        return self.interrupt(timeout)

    def kill(self) -> None:
        """SIGKILL, and wait for it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30, *, warn: Callable[[str], object] | None = None) -> int:
        """SIGINT (Veil drains and stops its own nats-server on it) and wait; SIGKILL when it
        is still running after timeout seconds, telling warn first. The exit code."""
        try:
            return self.interrupt(timeout)
        except subprocess.TimeoutExpired:
            if warn is not None:
                warn(f"{self.name} ignored SIGINT for {timeout:.0f} s: killed")
            self.kill()
            self._collect_rest()
            return self.proc.returncode

    def finish(self, timeout: float = 30) -> list[str]:
        """Close its stdin (the end of its input), wait for it to exit, and all it printed."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout)
        self._collect_rest()
        return self.lines

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class VeilProcess(Child):
    """A `veil ...` child (unbuffered, stderr with stdout unless `stderr` says otherwise),
    in the repository by default."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str],
        cwd: Path | None = None,
        stderr: Path | int = subprocess.STDOUT,
    ) -> None:
        self.args = args
        super().__init__(
            [sys.executable, "-m", "veil.cli", *args],
            name=f"veil {args[0]}" if args else "veil",
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            cwd=cwd,
            stderr=stderr,
        )


def run_veil(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`veil ...` to its end, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "veil.cli", *args],
        check=False,
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def nats_server(store_dir: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream storing in store_dir (its URL is `.url`), stopped on
    the way out whatever happens."""
    server = NatsServer(store_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


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
