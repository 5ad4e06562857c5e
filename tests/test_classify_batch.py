"""``newsmon score`` and the ONNX backends, with the real model."""

from __future__ import annotations

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
    assert (tmp_path / ("model_int8.onnx" if backend == "onnx-int8" else "model.onnx")).is_file()
