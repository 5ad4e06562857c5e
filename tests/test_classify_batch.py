"""``newsmon score`` and the ONNX backends, with the real model."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from newsmon.classify.batch import parse_line

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parent.parent


def test_parse_line_gives_reasons() -> None:
    assert parse_line(3, b"[1]").error == "line 3: not a JSON object"
    assert parse_line(4, b'{"title": "x"}').error == "line 4: no id"
    assert parse_line(5, b'{"id": 1, "title": " ", "summary": ""}').error == (
        "line 5: empty title and text"
    )
    line = parse_line(6, b'{"id": 2, "title": "caf\xe9", "summary": "s", "content": "longer"}')
    assert line.error is None and line.title == "caf\ufffd" and line.text == "longer"


def test_score_command_writes_one_line_per_input_in_order(tmp_path: Path) -> None:
    rows = [
        {
            "id": "a",
            "title": "Fentanyl pills seized at the border",
            "summary": "Agents found 1m pills.",
        },
        {"id": "b", "title": "Local bakery wins award", "summary": "Best bread in town."},
    ]
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        b"\n".join(json.dumps(r).encode() for r in rows[:1])
        + b"\nnot json\n"
        + json.dumps(rows[1]).encode()
        + b"\n"
    )
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "newsmon.cli", "score", str(source), "-o", str(out),
         "--topics", str(ROOT / "seeds/topics.toml")],
        capture_output=True, cwd=tmp_path, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # one bad line
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", None, "b"]
    assert lines[0]["matches"] == ["fentanyl"]
    assert set(lines[0]["scores"]) == {
        "fentanyl",
        "cartel-arrests",
        "extradition",
        "us-mexico-summit",
    }
    assert lines[1]["error"].startswith("line 2: not JSON")
    assert lines[2]["matches"] == []
    assert b"3 articles scored with 4 topics" in result.stderr


def test_score_from_any_directory_on_a_fresh_database_then_the_service_starts(
    tmp_path: Path,
) -> None:
    """Outside the checkout, with no settings: the packaged seeds, the migrated schema."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "a", "title": "Fentanyl pills seized at the border"}))

    def newsmon(*args: str) -> subprocess.CompletedProcess[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSMON_")}
        return subprocess.run(
            [sys.executable, "-m", "newsmon.cli", *args],
            capture_output=True, cwd=tmp_path, env=env, timeout=300, check=False,
        )  # fmt: skip

    scored = newsmon("score", str(source), "-o", str(tmp_path / "out.jsonl"))
    assert scored.returncode == 0, scored.stderr
    [line] = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert line["matches"] == ["fentanyl"]
    # What `newsmon run` does first, on the database `score` just made: nothing to create twice.
    migrated = newsmon("migrate")
    assert migrated.returncode == 0, migrated.stderr


def test_a_backtest_scores_each_day_before_its_labels_and_learns_from_them(
    tmp_path: Path,
) -> None:
    """Day one: a story the simulated operator says is not fentanyl news matches, and is
    labelled. Day two: a rewrite of it scores lower than it would without feedback, the
    article unlike it scores the same, and the real database keeps no label."""
    false_alarm = "Fentanyl talk show host wins an award for his comedy special"
    rows = [
        {"id": "d1-a", "published": "2023-01-01T09:00:00Z", "title": false_alarm},
        {"id": "d1-b", "published": "2023-01-01T18:00:00+00:00", "title": "Bakery wins prize"},
        {"id": "d2-a", "published": "2023-01-02T08:00:00Z", "title": false_alarm + " again"},
        {"id": "d2-b", "published": "2023-01-02T09:00:00Z",
         "title": "Border agents seize 40,000 fentanyl pills hidden in a truck"},
    ]  # fmt: skip
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"id": "d2-b", "topics": ["fentanyl"]}) + "\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEWSMON_")},
        "NEWSMON_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'real.db'}",
    }

    def score(*extra: str) -> tuple[list[dict[str, Any]], bytes]:
        out = tmp_path / f"out{len(extra)}.jsonl"
        result = subprocess.run(
            [sys.executable, "-m", "newsmon.cli", "score", str(source), "-o", str(out), *extra],
            capture_output=True, cwd=tmp_path, env=env, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in out.read_text().splitlines()], result.stderr

    plain, _ = score()
    assert "fentanyl" in plain[0]["matches"], "the false alarm must match to be labelled"
    learned, stderr = score("--feedback", str(labels), "--review-per-day", "1")
    assert [line["id"] for line in learned] == [r["id"] for r in rows]
    # Day one is scored before any label; so is each line before its own day's labels.
    assert learned[:2] == plain[:2]
    assert learned[2]["scores"]["fentanyl"] < plain[2]["scores"]["fentanyl"]
    assert "fentanyl" not in learned[2]["matches"]
    assert learned[3]["matches"] == plain[3]["matches"] == ["fentanyl"]
    # Day one: the false alarm (matched). Day two: the seizure (matched) and, from the review
    # queue, the rewrite it now keeps below the threshold. The bakery fails the keyword gate.
    assert b"feedback: 3 labels over 2 days (fentanyl 1 relevant / 2 not)" in stderr

    async def real_labels() -> int:
        from sqlalchemy import func, select

        from newsmon.classify.store import labels_table
        from newsmon.db import open_engine

        engine = open_engine(env["NEWSMON_DATABASE_URL"])
        try:
            async with engine.connect() as conn:
                return int(await conn.scalar(select(func.count()).select_from(labels_table)) or 0)
        finally:
            await engine.dispose()

    assert asyncio.run(real_labels()) == 0


@pytest.mark.parametrize(("backend", "min_cosine"), [("onnx", 0.9999), ("onnx-int8", 0.85)])
def test_onnx_backends_agree_with_torch(
    embedder: Any, tmp_path: Path, backend: Any, min_cosine: float
) -> None:
    from newsmon.classify.model import SentenceTransformerEmbedder

    onnx = SentenceTransformerEmbedder(backend=backend, cache_dir=tmp_path)
    texts = ["Fentanyl seized at the border.", "short", "word " * 400, "Погода"]
    a, b = embedder.embed(texts), onnx.embed(texts)
    assert b.shape == a.shape
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    assert (a * b).sum(axis=1).min() >= min_cosine
    # Exported into a folder of the model's own under the cache directory.
    assert list(
        tmp_path.glob("*/" + ("model_int8.onnx" if backend == "onnx-int8" else "model.onnx"))
    )
