"""The `newsmon` command as a user runs it: a real process, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port


def newsmon(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "newsmon.cli", *args],
        env={**os.environ, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def get_json(url: str, timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.model
def test_run_serves_the_api_shows_alerts_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`newsmon run` from the repo's seeds: the seed article is printed as four alerts."""
    port = free_port()
    env = {
        "NEWSMON_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'newsmon.db'}",
        "NEWSMON_FEEDS_FILE": str(ROOT / "seeds/feeds.toml"),
        "NEWSMON_TOPICS_FILE": str(ROOT / "seeds/topics.toml"),
        "NEWSMON_SUBSCRIPTIONS_FILE": str(ROOT / "seeds/subscriptions.toml"),
    }
    process = newsmon("run", "--port", str(port), env=env, cwd=tmp_path)
    try:
        assert get_json(f"http://127.0.0.1:{port}/healthz") == {"status": "ok"}
        topics = get_json(f"http://127.0.0.1:{port}/topics")
        assert isinstance(topics, list) and len(topics) == 4
        # Observable state, not a fixed sleep: the four alerts are recorded as delivered.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            delivered = get_json(f"http://127.0.0.1:{port}/deliveries?status=delivered")
            if isinstance(delivered, list) and len(delivered) == 4:
                break
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    text = output.decode()
    assert process.returncode == 0, text
    for slug in ("fentanyl", "cartel-arrests", "extradition", "us-mexico-summit"):
        assert f"ALERT [{slug}]" in text, text
    assert "newsmon stopped" in text


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"NEWSMON_API_KEYS": '[{"name": "ops", "key"'}, "api_keys"),
        ({"NEWSMON_API_KEYS": '[{"name": "ops", "key": "short", "role": "admin"}]'}, "API_KEYS"),
        ({"NEWSMON_FEEDS_FILE": "missing/feeds.toml"}, "NEWSMON_FEEDS_FILE"),
    ],
)
def test_bad_settings_are_one_clear_line_not_a_traceback(
    tmp_path: Path, env: dict[str, str], names: str
) -> None:
    process = newsmon("migrate", env=env, cwd=tmp_path)
    output, _ = process.communicate(timeout=60)
    text = output.decode()
    assert process.returncode == 2, text
    assert "Traceback" not in text and names in text
    assert text.strip().count("\n") == 0, text


def test_a_single_service_refuses_the_memory_bus(tmp_path: Path) -> None:
    process = newsmon("classify", env={"NEWSMON_BUS_URL": "memory://"}, cwd=tmp_path)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2
    assert b"needs a shared bus" in output


def test_an_unreachable_broker_exits_non_zero_with_a_clear_message(tmp_path: Path) -> None:
    env = {
        "NEWSMON_BUS_URL": f"kafka://127.0.0.1:{free_port()}",
        "NEWSMON_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
        "NEWSMON_FEEDS_FILE": str(ROOT / "seeds/feeds.toml"),
        "NEWSMON_HTTP_PORT": "0",
    }
    process = newsmon("ingest", env=env, cwd=tmp_path)
    output, _ = process.communicate(timeout=90)
    assert process.returncode == 1
    assert b"cannot reach Kafka" in output


STUBBORN = """
import asyncio, logging
from newsmon import runner
from newsmon.settings import Settings

class Stubborn:
    name = "stubborn"

    def ready(self):
        return True

    async def run(self, stop):
        await stop.wait()
        print("stubborn: finishing in-flight work", flush=True)
        await asyncio.sleep(60)

logging.basicConfig(level=logging.INFO)
runner.build_parts = lambda *args: [runner.Part(Stubborn(), [])]
asyncio.run(runner.serve(Settings(), ["ingest"]))
"""


def stubborn_process(tmp_path: Path, shutdown_timeout: float) -> subprocess.Popen[bytes]:
    """A real newsmon runner whose one service takes 60 s to finish after the stop signal."""
    env = {
        "NEWSMON_SHUTDOWN_TIMEOUT_S": str(shutdown_timeout),
        "NEWSMON_HTTP_PORT": str(free_port()),
        "NEWSMON_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", STUBBORN],
        env={**os.environ, **env},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    get_json(f"http://127.0.0.1:{env['NEWSMON_HTTP_PORT']}/healthz")
    return process


def test_sigterm_gives_in_flight_work_a_deadline_then_exits_zero(tmp_path: Path) -> None:
    process = stubborn_process(tmp_path, shutdown_timeout=2)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output.decode()
    assert 1.5 < time.monotonic() - started < 15
    assert b"stubborn did not stop within 2 s: cancelled" in output
    assert b"newsmon stopped" in output


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    process = stubborn_process(tmp_path, shutdown_timeout=60)
    process.send_signal(signal.SIGTERM)
    time.sleep(1)
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert time.monotonic() - started < 5
    assert process.returncode == 128 + signal.SIGINT, output.decode()
    assert b"stubborn: finishing in-flight work" in output
    assert b"second SIGINT: exiting now" in output
