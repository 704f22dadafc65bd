"""The embedding model Veil runs: built once per machine into the cache, the same bytes every time."""

from __future__ import annotations

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


def test_an_unwritable_cache_still_gives_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("VEIL_CACHE_DIR", str(blocker / "cache"))
    assert quantized.model_id(quantized.load(model_file())) == default_embedder().model_id


def test_the_cache_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VEIL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert quantized.cache_dir() == tmp_path / "veil"
    monkeypatch.setenv("VEIL_CACHE_DIR", str(tmp_path / "mine"))
    assert quantized.cache_dir() == tmp_path / "mine"


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

