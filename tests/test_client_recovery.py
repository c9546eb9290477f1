"""Lazy Pirate recovery: the server process is killed and restarted on the same port mid-stream; the
client reports the failure within its retry budget and works again afterwards (sync and asyncio)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lisa_agent import AsyncLisaClient, LisaClient
from lisa_agent.benchmarks.server import EchoBackend, synthetic_frame
from lisa_agent.errors import ServerUnavailableError
from lisa_agent.serving.server import LisaServer

SLACK_S = 5.0  # scheduling slack on a loaded 2-core CI machine; the bound itself is timeout * (retries + 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``lisa-agent serve`` in a subprocess; ``start()`` returns once the startup line is logged."""

    def __init__(self, checkpoint: Path, port: int) -> None:
        self.cmd = [sys.executable, "-m", "lisa_agent.cli", "serve", "--model", str(checkpoint),
                    "--bind", f"tcp://127.0.0.1:{port}", "--max-queue", "8"]
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def start(self, timeout: float = 120.0) -> None:
        self.lines = []
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env=dict(os.environ))
        ready = threading.Event()

        def read(proc: subprocess.Popen[str], lines: list[str]) -> None:
            for line in proc.stderr:  # type: ignore[union-attr]
                lines.append(line)
                if " serving " in line:
                    ready.set()

        threading.Thread(target=read, args=(self.proc, self.lines), daemon=True).start()
        end = time.monotonic() + timeout
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.kill()
                pytest.fail("lisa-agent serve did not start:\n" + "".join(self.lines))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


@pytest.fixture
def serve(tiny_checkpoint):
    server = ServeProcess(tiny_checkpoint, free_port())
    yield server
    server.kill()


@pytest.mark.slow  # kills and restarts a `lisa-agent serve` process, waiting out client timeouts
def test_killed_server_is_reported_then_the_same_client_recovers_after_restart_and_sigterm_stops_it(serve):
    endpoint = serve.cmd[serve.cmd.index("--bind") + 1]
    serve.start()
    frame = synthetic_frame(48, 64)
    # generous while the model warms up (a cold first call can take seconds on a loaded CI machine)
    client = LisaClient(endpoint, timeout=30.0, retries=1)
    try:
        before = [client.segment(frame, "the cup", frame_id=k) for k in range(3)]
        assert all(r.text and r.masks.shape[1:] == (48, 64) for r in before)

        client.timeout = 2.0
        serve.kill()  # SIGKILL: no goodbye, sockets vanish mid-stream
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="no reply from the LISA server") as info:
            client.segment(frame, "the cup", frame_id=3)
        elapsed = time.monotonic() - t0
        assert info.value.code == "unavailable"
        assert elapsed < client.timeout * (client.retries + 1) + SLACK_S  # bounded: it did not hang

        serve.start()  # same port
        client.timeout = 30.0  # warm-up again
        after = client.segment(frame, "the cup", frame_id=4)
        assert after.text == before[0].text
        assert (after.masks == before[0].masks).all()
        assert client.info()["protocol_version"] == 2
    finally:
        client.close()

    # SIGTERM (what systemd / docker send) stops the server cleanly
    assert serve.terminate() == 0
    log = "".join(serve.lines)
    assert "SIGTERM" in log and "stopped" in log
    assert f"on {endpoint}" in log  # the startup line names the bound endpoint


def test_client_started_before_the_server_gets_through_on_a_retry():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = LisaServer(EchoBackend(), endpoint)
    timer = threading.Timer(0.8, server.start)
    timer.start()
    try:
        with LisaClient(endpoint, timeout=0.5, retries=8) as client:
            assert client.segment(synthetic_frame(48, 64), "cup").text == "Sure, [SEG]."
    finally:
        timer.join()
        server.stop()


def test_async_client_reports_a_stopped_server_and_recovers_after_restart():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    frame = synthetic_frame(48, 64)

    async def scenario() -> None:
        async with AsyncLisaClient(endpoint, timeout=0.5, retries=1) as client:
            with LisaServer(EchoBackend(), endpoint):
                others = [AsyncLisaClient(endpoint, timeout=5, retries=0) for _ in range(4)]
                results = await asyncio.gather(*(c.segment(frame, f"q{k}") for k, c in enumerate(others)))
                for c in others:
                    c.close()
                assert [r.query for r in results] == ["q0", "q1", "q2", "q3"]
                assert (await client.health())["status"] == "ok"
            t0 = time.monotonic()
            with pytest.raises(ServerUnavailableError):
                await client.segment(frame, "cup")
            assert time.monotonic() - t0 < 0.5 * 2 + SLACK_S
            with LisaServer(EchoBackend(), endpoint):
                result = await client.segment(frame, "cup")
                assert result.text == "Sure, [SEG]." and result.masks.shape == (1, 48, 64)

    asyncio.run(asyncio.wait_for(scenario(), 60))
