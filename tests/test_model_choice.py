"""Model choice: ``NEWSMON_MODEL_PATH`` names a local sentence-transformers directory.

Unset, the packaged all-MiniLM-L6-v2 loads; a path that is not a usable model fails with its
name in the message, before anything loads; every model gets an ONNX export of its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from newsmon.bus import MemoryBus
from newsmon.classify.model import (
    ModelError,
    SentenceTransformerEmbedder,
    check_model_dir,
    model_cache_key,
    packaged_model_path,
)
from newsmon.classify.service import ClassifyService
from newsmon.settings import Settings

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]


def fake_model(path: Path, *, weights: str = "model.safetensors") -> Path:
    """A directory shaped like a sentence-transformers model, with placeholder files."""
    path.mkdir(parents=True)
    (path / "modules.json").write_text(json.dumps(MODULES))
    (path / "config.json").write_text("{}")
    (path / weights).write_bytes(b"\0" * 16)
    return path


def test_the_setting_is_unset_by_default_and_reads_a_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("NEWSMON_MODEL_PATH", raising=False)
    assert Settings().model_path is None
    monkeypatch.setenv("NEWSMON_MODEL_PATH", str(tmp_path / "all-mpnet-base-v2"))
    assert Settings().model_path == tmp_path / "all-mpnet-base-v2"


def test_a_sentence_transformers_directory_passes_the_check(tmp_path: Path) -> None:
    assert check_model_dir(fake_model(tmp_path / "m")) == tmp_path / "m"
    assert check_model_dir(packaged_model_path()) == packaged_model_path()


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.write_text("weights"), p)[1], "is not a directory"),
        (lambda p: (p.mkdir(), p)[1], "is not a sentence-transformers model directory"),
        (
            lambda p: (fake_model(p), (p / "modules.json").write_text("[{}]"), p)[2],
            "no readable modules.json naming a Transformer module",
        ),
        (lambda p: fake_model(p, weights="pytorch_model.bin"), "has no model.safetensors"),
        (lambda p: (fake_model(p), (p / "config.json").unlink(), p)[2], "has no config.json"),
    ],
    ids=["missing", "a-file", "no-modules-json", "no-transformer", "pickled-weights", "no-config"],
)
def test_an_unusable_directory_is_refused_by_name(tmp_path: Path, make: Any, says: str) -> None:
    path = make(tmp_path / "my-model")
    with pytest.raises(ModelError, match=says) as refused:
        check_model_dir(path)
    assert str(tmp_path / "my-model") in str(refused.value)


def test_a_relative_path_is_reported_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=re.escape(str(tmp_path / "models" / "nope"))):
        check_model_dir(Path("models/nope"))


async def test_the_service_refuses_a_bad_model_path_before_loading_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NEWSMON_MODEL_PATH", str(tmp_path / "typo"))
    with pytest.raises(ModelError, match=re.escape(f"{tmp_path / 'typo'}' does not exist")):
        ClassifyService.from_settings(Settings(), MemoryBus(), engine=None)  # type: ignore[arg-type]


def test_cache_keys_tell_models_apart(tmp_path: Path) -> None:
    a, b = fake_model(tmp_path / "a"), fake_model(tmp_path / "b")
    assert model_cache_key(a) == model_cache_key(a)
    assert model_cache_key(a) != model_cache_key(b)
    assert model_cache_key(a).startswith("a-")
    before = model_cache_key(a)
    (a / "model.safetensors").write_bytes(b"\1" * 32)  # the model replaced in place
    assert model_cache_key(a) != before


@pytest.mark.model
def test_the_default_is_the_packaged_model_and_naming_it_loads_the_same(
    embedder: SentenceTransformerEmbedder,
) -> None:
    assert embedder.model_path == packaged_model_path()
    named = SentenceTransformerEmbedder(model_path=packaged_model_path())
    texts = ["Fentanyl seized at the border.", "Mexico extradited a cartel leader."]
    assert np.allclose(named.embed(texts), embedder.embed(texts), atol=1e-6)
    assert named.dimensions == 384


@pytest.mark.model
def test_two_models_never_share_an_onnx_export(
    embedder: SentenceTransformerEmbedder, tmp_path: Path
) -> None:
    # A second model directory: the packaged files, linked under another name.
    other = tmp_path / "models" / "minilm-copy"
    for source in packaged_model_path().rglob("*"):
        target = other / source.relative_to(packaged_model_path())
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    cache = tmp_path / "onnx"
    first = SentenceTransformerEmbedder(backend="onnx", cache_dir=cache)
    second = SentenceTransformerEmbedder(backend="onnx", cache_dir=cache, model_path=other)
    exports = sorted(p.relative_to(cache).parent.name for p in cache.glob("*/model.onnx"))
    assert exports == sorted([model_cache_key(packaged_model_path()), model_cache_key(other)])
    text = ["Border agents seized fentanyl pills."]
    assert np.allclose(first.embed(text), second.embed(text), atol=1e-5)
