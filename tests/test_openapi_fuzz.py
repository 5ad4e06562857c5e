"""Schemathesis against `newsmon run`'s own OpenAPI schema: no input may cause a 5xx.

Generated requests register feeds and webhooks at arbitrary URLs, so the service and the fuzzer
run in a network namespace of their own with only a loopback interface: nothing they do can
reach another host.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, unavailable

KEY = "fuzz-admin-key-0123456789abcdef"

SCRIPT = r"""
set -u
ip link set lo up
"$PYTHON" -m newsmon.cli run --port 8765 > "$WORK/newsmon.log" 2>&1 &
pid=$!
for _ in $(seq 1 240); do
  curl -sf http://127.0.0.1:8765/readyz > /dev/null && break
  sleep 0.5
done
"$PYTHON" -m schemathesis.cli run http://127.0.0.1:8765/openapi.json \
  --checks not_a_server_error --max-examples 6 --seed 20261127 \
  --header "Authorization: Bearer $KEY" --request-timeout 60 --no-color
status=$?
# Concurrent creation of one thing: ten at once, each kind; every answer is recorded.
post() {
  curl -s -o /dev/null -w "$1 %{http_code}\n" -X POST "http://127.0.0.1:8765$2" \
    -H "Authorization: Bearer $KEY" -H "content-type: application/json" -d "$3"
}
(
  for _ in $(seq 1 10); do
    post topics /topics '{"slug": "race", "name": "Race", "description": "a race", "examples": ["a race"], "threshold": 0.6}' &
    post feeds /feeds '{"url": "http://127.0.0.1:9/race.xml"}' &
    post subscriptions /subscriptions '{"id": "race", "channel": "log"}' &
  done
  wait
) > "$WORK/concurrent.txt"
kill -TERM "$pid"
wait "$pid"
exit "$status"
"""


@pytest.mark.model
def test_no_request_to_the_api_causes_a_server_error(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        unavailable("unshare and ip are needed to isolate the fuzzed service from the network")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        unavailable(f"cannot create a network namespace: {probe.stderr.decode().strip()}")
    seed_feed = (ROOT / "seeds/feeds/seed-article.xml").as_uri()
    (tmp_path / "feeds.toml").write_text(f'[[feeds]]\nurl = "{seed_feed}"\n')
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "WORK": str(tmp_path),
        "KEY": KEY,
        "NEWSMON_API_KEYS": f'[{{"name": "fuzz", "key": "{KEY}", "role": "admin"}}]',
        "NEWSMON_API_RATE_BURST": "1000000",
        "NEWSMON_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'fuzz.db'}",
        "NEWSMON_FEEDS_FILE": str(tmp_path / "feeds.toml"),
        "NEWSMON_TOPICS_FILE": str(ROOT / "seeds/topics.toml"),
        "NEWSMON_SUBSCRIPTIONS_FILE": str(ROOT / "seeds/subscriptions.toml"),
        "NEWSMON_WEBHOOK_TIMEOUT_S": "2",
        "NEWSMON_FEED_ALLOW_PRIVATE": "true",
    }
    result = subprocess.run(
        ["unshare", "-n", "bash", "-c", SCRIPT],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    service_log = (
        (tmp_path / "newsmon.log").read_text() if (tmp_path / "newsmon.log").exists() else ""
    )
    assert result.returncode == 0, (
        result.stdout[-6000:]
        + result.stderr[-2000:]
        + "\n--- newsmon log ---\n"
        + service_log[-4000:]
    )
    # Ten concurrent creations of one topic, feed and subscription: one is made, the others
    # are told why (422 for a taken slug or URL, 409 for a taken subscription id), none is a 5xx.
    answers = [line.split() for line in (tmp_path / "concurrent.txt").read_text().splitlines()]
    for kind, refusal in (("topics", "422"), ("feeds", "422"), ("subscriptions", "409")):
        codes = sorted(code for k, code in answers if k == kind)
        assert codes == sorted(["201"] + [refusal] * 9), (kind, codes)
    # It really ran: hundreds of generated requests across every operation, all passing.
    counts = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert counts is not None, result.stdout[-3000:]
    assert int(counts[2]) >= 500
