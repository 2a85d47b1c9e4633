"""Worker processes started by the demo, the benchmark and the tests: start, wait, stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from streams.settings import Settings


def start_worker(settings: Settings, *, sink: bool, log_path: Path | None = None) -> subprocess.Popen:
    """A worker with these settings in its own process group (so that stopping it stops all of it)."""
    return _start(["worker"] + (["--sink"] if sink else []), settings, log_path)


def start_sink(settings: Settings, *, log_path: Path | None = None) -> subprocess.Popen:
    """``abstream sink`` (the sink role alone) with these settings, in its own process group;
    wait_healthy and stop_worker apply to it as to a worker."""
    return _start(["sink"], settings, log_path)


def _start(command: list[str], settings: Settings, log_path: Path | None) -> subprocess.Popen:
    args = [sys.executable, "-m", "streams.cli", *command]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    env = {**os.environ, **settings.to_env()}
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def wait_healthy(settings: Settings, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Return once the worker answers /health; raise if it exits or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    url = f"http://{settings.web_host}:{settings.web_port}/health"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited with code {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if json.loads(response.read())["status"] == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the worker did not answer at {url} within {timeout_s:.0f} s")


def stop_worker(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM the worker's process group, SIGKILL it after the timeout."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
