"""cormlm: PyTorch-native Llama / Mistral / Falcon with a ragged, evicting KV cache.

    import cormlm
    model = cormlm.load_model("path/or/hub-id")
    tok = cormlm.load_tokenizer("path/or/hub-id")
    out = cormlm.generate(model, ids, max_new_tokens=64, cache=cormlm.CacheConfig("full"))
"""

from __future__ import annotations

import os

from .cache import CacheConfig, CacheStats, KVCache, available_policies, make_cache
from .checkpoint.gguf_file import is_gguf, open_gguf
from .checkpoint.hf_config import supported_model_types
from .checkpoint.hub import resolve_checkpoint
from .checkpoint.load import load_model
from .checkpoint.tokenizer import Tokenizer, load_tokenizer_from_folder
from .compile import compile_model
from .config import ModelConfig
from .errors import (
    CacheConfigError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CormlmError,
    HubError,
    InputError,
    UnsupportedModelError,
)
from .generate import GenerationOutput, generate
from .pack import pack_weights


def load_tokenizer(model: str | os.PathLike, *, revision: str | None = None,
                   cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint folder or hub id (tokenizer.json or tokenizer.model), or of a GGUF file
    (its tokenizer metadata)."""
    path = resolve_checkpoint(model, revision=revision, cache_dir=cache_dir)
    if is_gguf(path):
        from .checkpoint.gguf_tokenizer import tokenizer_from_gguf
        return tokenizer_from_gguf(open_gguf(path), path)
    return load_tokenizer_from_folder(path)


__all__ = [
    "CacheConfig", "CacheConfigError", "CacheStats", "CheckpointError", "CheckpointNotFoundError", "ConfigError",
    "CormlmError", "GenerationOutput", "HubError", "InputError", "KVCache", "ModelConfig", "Tokenizer",
    "UnsupportedModelError", "available_policies", "compile_model", "generate", "load_model", "load_tokenizer", "make_cache",
    "pack_weights", "supported_model_types",
]
