"""The embedding model Veil runs: built once per machine into the cache, the same bytes every time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from actors.memory import quantized
from actors.memory.embedder import default_embedder, model_file


def test_the_model_is_built_once_into_the_cache_with_the_same_bytes_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{quantized.MODEL_NAME}-int8-older-recipe.onnx").write_bytes(b"an earlier build")
    monkeypatch.setenv("VEIL_CACHE_DIR", str(cache))
    built = quantized.load(model_file())
    # Another build (the default embedder's, from the user's cache) gave the same bytes.
    assert quantized.model_id(built) == default_embedder().model_id
    assert b"MatMulInteger" in built and b"DynamicQuantizeLinear" not in built
    [kept] = [p for p in cache.iterdir() if p.suffix == ".onnx"]  # the older build is gone
    assert kept.read_bytes() == built
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no build leftovers

    def no_build(source: Path, target: Path) -> None:
        raise AssertionError("built again")

    monkeypatch.setattr(quantized, "build", no_build)
    assert quantized.load(model_file()) == built


def test_an_unwritable_cache_still_gives_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("VEIL_CACHE_DIR", str(blocker / "cache"))
    assert quantized.model_id(quantized.load(model_file())) == default_embedder().model_id


def test_processes_starting_together_build_once_and_load_the_same_model(tmp_path: Path) -> None:
    script = (
        "from actors.memory import quantized\n"
        "from actors.memory.embedder import model_file\n"
        "print(quantized.model_id(quantized.load(model_file())))\n"
    )
    env = {"VEIL_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ids = {out.strip().splitlines()[-1] for out, _ in outs}
    assert ids == {default_embedder().model_id}
    assert sum("memory.building_embedding_model" in out + err for out, err in outs) == 1
    assert len(list(tmp_path.glob("*.onnx"))) == 1


def test_the_cache_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VEIL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert quantized.cache_dir() == tmp_path / "veil"
    monkeypatch.setenv("VEIL_CACHE_DIR", str(tmp_path / "mine"))
    assert quantized.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("VEIL_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", no_home)
    assert quantized.cache_dir().name == "veil-cache"


@pytest.mark.parametrize("writable", [True, False])
def test_a_build_that_disagrees_with_the_shipped_model_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writable: bool
) -> None:
    if not writable:
        (tmp_path / "a-file").write_text("not a directory")
    cache = tmp_path if writable else tmp_path / "a-file" / "cache"
    monkeypatch.setenv("VEIL_CACHE_DIR", str(cache))
    monkeypatch.setattr(quantized, "_MIN_AGREEMENT", 1.01)  # no build can pass this
    assert quantized.load(model_file()) == model_file().read_bytes()
    assert not list(tmp_path.glob("*.onnx"))


def test_equalizing_the_down_projections_is_exact_before_quantization(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    folded = tmp_path / "folded.onnx"
    quantized.fold(model_file(), folded)
    model = onnx.load(str(folded))
    quantized._equalize_down_projections(model)
    assert (
        sum(node.output[0].endswith("_equalized") for node in model.graph.node) == 6
    )  # one per layer
    ids = np.asarray([[101, 2026, 2905, 3268, 1999, 11929, 1012, 102]], np.int64)
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }
    before, after = (
        ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for m in (folded.read_bytes(), model.SerializeToString())
    )
    assert np.allclose(before, after, rtol=1e-3, atol=1e-4)
