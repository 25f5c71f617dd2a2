"""One tokenizer interface over the two formats Hugging Face checkpoints ship.

A checkpoint folder holds either ``tokenizer.json`` (the Rust ``tokenizers`` format: Llama 3,
Mistral, Falcon, converted Llama 2) or only ``tokenizer.model`` (a ``sentencepiece`` model:
older Llama 2 conversions).  Neither file alone says everything inference needs: which
special tokens exist, whether a prompt starts with BOS, and which ids end generation are
spread over ``tokenizer_config.json``, ``special_tokens_map.json`` and
``generation_config.json``.  :func:`load_tokenizer_from_folder` reads all of them and
:class:`Tokenizer` answers with plain ids, so model code never has to know the format.

Choices where the checkpoint files leave room:

* ``tokenizer_config.json`` wins over ``special_tokens_map.json`` for a token named in both
  (the latter is the legacy file; transformers reads it only when the config has no
  ``added_tokens_decoder``).
* Explicit ``add_bos_token`` / ``add_eos_token`` are honoured for tokenizer.json too (as
  transformers 4 did; transformers 5 drops them when tokenizer.json exists); a flag left out
  keeps what the tokenizer.json post-processor does.
* A special token a config names but the vocabulary lacks is a :class:`ConfigError`; we never
  invent new ids, because the model has no embedding rows for them.
* ``clean_up_tokenization_spaces`` is ignored: it rewrites " ." to "." and so breaks
  ``decode(encode(text)) == text``.
* ``tokenizer.model``: text is split on special/added token strings and each piece is encoded
  on its own, exactly as Meta's reference Llama 2 code encodes each dialog segment; that is
  transformers' ``legacy=True`` behaviour (``legacy: false`` is not honoured).  With Llama 2's
  trainer options (identity normalisation, byte fallback) ``decode(encode(text)) == text``
  for any text without U+2581 "▁", which sentencepiece reads as a space.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError, InputError
from .jsonfiles import read_optional_json

__all__ = ["Tokenizer", "load_tokenizer_from_folder"]

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"

_NAMED_SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
    """One interface over tokenizer.json (HF `tokenizers`) and tokenizer.model (`sentencepiece`).

    Build it with :func:`load_tokenizer_from_folder`; the subclasses hold the format-specific
    parts, this class the special-token bookkeeping and input checks they share.
    """

    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    unk_token_id: int | None
    vocab_size: int
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def __init__(self, source: Path) -> None:
        # Filled in by the loader; ``source`` is the file, for messages and repr.
        self.source = source
        self.bos_token_id = None
        self.eos_token_ids = []
        self.pad_token_id = None
        self.unk_token_id = None
        self.vocab_size = 0
        self.add_bos = False
        self.add_eos = False
        self.chat_template = None
        self._special_ids: frozenset[int] = frozenset()
        # The tokenizer's own eos (what add_eos appends); eos_token_ids may list more stop ids.
        self._tokenizer_eos_id: int | None = None

    # ----------------------------------------------------------------- public API

    @property
    def eos_token_id(self) -> int | None:
        """The first stop id, for callers that want a single one (e.g. as a pad fallback)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` BOS/EOS as the checkpoint asks."""
        if not isinstance(text, str):
            raise InputError(f"encode() takes a str, got {type(text).__name__}")
        try:
            return self._encode(text, add_special_tokens)
        except (TypeError, RuntimeError, UnicodeError):
            # Both libraries reject lone surrogates with obscure messages; say what is wrong.
            # Checked only on failure so that valid text pays nothing for it.
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InputError(
                    f"text is not valid Unicode: lone surrogate {text[exc.start]!r} at index {exc.start}"
                ) from None
            raise

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is False."""
        return self._decode(self._check_ids(ids), skip_special_tokens)

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded [B, T] int64 input_ids and [B, T] int64 attention_mask (1 = real token).

        Left padding keeps every prompt's last token in the last column, where generation
        continues.  Pad positions hold ``pad_token_id``, or the first EOS id when the
        checkpoint has no pad token (or 0 without either); the mask is what marks them.
        """
        if isinstance(texts, str):
            raise InputError("encode_batch() takes a sequence of str, got a single str; use encode()")
        rows = [self.encode(text, add_special_tokens) for text in texts]
        width = max((len(row) for row in rows), default=0)
        pad = self.pad_token_id if self.pad_token_id is not None else (self.eos_token_id or 0)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, row in enumerate(rows):
            if row:
                input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.int64)
                attention_mask[i, width - len(row) :] = 1
        return input_ids, attention_mask

    def token_to_id(self, token: str) -> int | None:
        """Id of the token string ``token`` (a vocabulary entry, not text to encode), or None."""
        raise NotImplementedError

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special token (BOS, EOS, pad, unk, special added tokens)."""
        try:
            return operator.index(token_id) in self._special_ids  # also 0-d tensors, numpy ints
        except TypeError:
            return False

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={str(self.source)!r}, vocab_size={self.vocab_size}, "
            f"bos_token_id={self.bos_token_id}, eos_token_ids={self.eos_token_ids}, "
            f"pad_token_id={self.pad_token_id}, add_bos={self.add_bos}, add_eos={self.add_eos})"
        )

    # ------------------------------------------------------------ subclass hooks

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def _has_id(self, token_id: int) -> bool:
        """Whether an id below vocab_size is assigned (added-token ids may leave gaps)."""
        return True

    # ------------------------------------------------------------------- helpers

    def _with_bos_eos(self, ids: list[int]) -> list[int]:
        """BOS/EOS added by us (sentencepiece, or tokenizer.json with explicit config flags)."""
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if self.add_eos and self._tokenizer_eos_id is not None:
            ids = [*ids, self._tokenizer_eos_id]
        return ids

    def _check_ids(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        """Plain non-negative in-vocabulary ints, or an InputError saying which id is wrong."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise InputError(
                    f"decode() takes a 1-D sequence of token ids, got a tensor of shape {tuple(ids.shape)}; "
                    "decode each row separately"
                )
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise InputError(f"token ids must be integers, got a tensor of dtype {ids.dtype}")
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise InputError(f"decode() takes a sequence of token ids, got {type(ids).__name__}")
        out: list[int] = []
        for item in ids:
            try:
                if isinstance(item, bool):
                    raise TypeError
                token_id = operator.index(item)
            except TypeError:
                raise InputError(f"token ids must be integers, got {item!r} ({type(item).__name__})") from None
            if not 0 <= token_id < self.vocab_size or not self._has_id(token_id):
                raise InputError(
                    f"token id {token_id} is outside the vocabulary of {self.source.name} "
                    f"(vocab size {self.vocab_size}, valid ids 0..{self.vocab_size - 1})"
                )
            out.append(token_id)
        return out


class _HFTokenizer(Tokenizer):
    """tokenizer.json through the ``tokenizers`` library."""

    def __init__(self, source: Path, backend: Any) -> None:
        super().__init__(source)
        self._tok = backend
        # True: the post-processor decides BOS/EOS; False: we add them as configured.
        self._use_post_processor = True

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if add_special_tokens and self._use_post_processor:
            return list(self._tok.encode(text, add_special_tokens=True).ids)
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        return self._with_bos_eos(ids) if add_special_tokens else ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Filter with our own notion of special (it also covers tokens that only the JSON
        # configs call special), then let the library's decoder join the rest.
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def _has_id(self, token_id: int) -> bool:
        return self._tok.id_to_token(token_id) is not None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class _SentencePieceTokenizer(Tokenizer):
    """tokenizer.model through ``sentencepiece``, plus the added tokens the JSON configs declare."""

    def __init__(self, source: Path, processor: Any) -> None:
        super().__init__(source)
        self._sp = processor
        self._piece_count: int = processor.get_piece_size()
        self._added: dict[int, str] = {}  # id -> content, overrides the model's piece
        self._added_ids: dict[str, int] = {}  # content -> id
        self._no_split: dict[str, int] = {}
        self._split_re: re.Pattern[str] | None = None

    def _set_no_split(self, tokens: dict[str, int]) -> None:
        """Strings matched literally in text before sentencepiece sees it, longest first."""
        self._no_split = dict(tokens)
        if tokens:
            alternatives = sorted(tokens, key=len, reverse=True)
            self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        chunks = self._split_re.split(text) if self._split_re is not None else [text]
        # re.split with one capturing group alternates: text, match, text, match, ...
        for index, chunk in enumerate(chunks):
            if index % 2:
                ids.append(self._no_split[chunk])
            elif chunk:
                ids.extend(self._sp.encode(chunk, out_type=int))
        return self._with_bos_eos(ids) if add_special_tokens else ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Runs of ordinary pieces go to sentencepiece (which merges byte-fallback pieces and
        # strips the dummy-prefix space once per run, mirroring _encode's per-chunk calls);
        # special and added tokens are rendered from their strings.
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            special = token_id in self._special_ids
            if token_id in self._added or special:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                if not (special and skip_special_tokens):
                    content = self._added.get(token_id)
                    parts.append(self._sp.id_to_piece(token_id) if content is None else content)
            else:
                run.append(token_id)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def _has_id(self, token_id: int) -> bool:
        return token_id < self._piece_count or token_id in self._added

    def token_to_id(self, token: str) -> int | None:
        if token in self._added_ids:
            return self._added_ids[token]
        token_id = self._sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces; only "<unk>" itself should map there.
        if token_id < 0 or self._sp.id_to_piece(token_id) != token:
            return None
        return token_id


# ---------------------------------------------------------------------- loading


def load_tokenizer_from_folder(folder: str | os.PathLike[str]) -> Tokenizer:
    """Load the tokenizer of a checkpoint folder as published on the Hugging Face hub.

    tokenizer.json is preferred over tokenizer.model because it carries the exact
    pre-tokenizer, added tokens and post-processor transformers uses.
    """
    path = Path(folder)
    if not path.exists():
        raise CheckpointNotFoundError(f"tokenizer folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a folder; pass the checkpoint folder that holds it")

    config = read_optional_json(path / TOKENIZER_CONFIG)
    special_map = read_optional_json(path / SPECIAL_TOKENS_MAP)
    generation = read_optional_json(path / GENERATION_CONFIG)
    named = _named_special_tokens(path, config, special_map)
    added_config = _config_added_tokens(path, config)
    extra_specials = _extra_special_strings(path, config, special_map)

    if (path / TOKENIZER_JSON).is_file():
        tokenizer: Tokenizer = _load_tokenizers_json(path / TOKENIZER_JSON, named, added_config, extra_specials)
    elif (path / TOKENIZER_MODEL).is_file():
        tokenizer = _load_sentencepiece(path / TOKENIZER_MODEL, named, added_config, extra_specials)
    else:
        raise CheckpointError(
            f"{path} holds no tokenizer: expected {TOKENIZER_JSON} or {TOKENIZER_MODEL}; "
            "copy the tokenizer files of the checkpoint into the folder"
        )

    _apply_flags(tokenizer, path, config)
    _apply_generation_config(tokenizer, path, generation)
    tokenizer.chat_template = _chat_template(path, config)
    return tokenizer


def _token_string(file: Path, key: str, value: Any) -> str | None:
    """A special token entry is a string, a dict with "content" (an AddedToken), or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    raise ConfigError(f"{file}: {key} must be a string or an object with a string \"content\", got {value!r}")


def _named_special_tokens(folder: Path, config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, str | None]:
    named: dict[str, str | None] = {}
    for key in _NAMED_SPECIALS:
        if key in config:
            named[key] = _token_string(folder / TOKENIZER_CONFIG, key, config[key])
        elif key in special_map:
            named[key] = _token_string(folder / SPECIAL_TOKENS_MAP, key, special_map[key])
    return named


def _config_added_tokens(folder: Path, config: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    """tokenizer_config.json "added_tokens_decoder": id -> (content, special)."""
    file = folder / TOKENIZER_CONFIG
    raw = config.get("added_tokens_decoder") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: added_tokens_decoder must be an object of id -> token, got {type(raw).__name__}")
    added: dict[int, tuple[str, bool]] = {}
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise ConfigError(f"{file}: added_tokens_decoder key {key!r} is not an integer id") from None
        if token_id < 0:
            raise ConfigError(f"{file}: added_tokens_decoder id {token_id} is negative")
        content = _token_string(file, f"added_tokens_decoder[{key}]", value)
        if content is None:
            raise ConfigError(f"{file}: added_tokens_decoder[{key}] has no content")
        special = bool(value.get("special", False)) if isinstance(value, dict) else False
        added[token_id] = (content, special)
    return added


def _extra_special_strings(folder: Path, config: dict[str, Any], special_map: dict[str, Any]) -> list[str]:
    """additional_special_tokens (or v5's extra_special_tokens) as plain strings."""
    out: list[str] = []
    for file, data in ((folder / TOKENIZER_CONFIG, config), (folder / SPECIAL_TOKENS_MAP, special_map)):
        for key in ("additional_special_tokens", "extra_special_tokens"):
            values = data.get(key) or []
            if isinstance(values, dict):  # v5 allows {"name": token}
                values = list(values.values())
            if not isinstance(values, list):
                raise ConfigError(f"{file}: {key} must be a list of tokens, got {type(values).__name__}")
            for value in values:
                content = _token_string(file, key, value)
                if content is not None and content not in out:
                    out.append(content)
    return out


def _resolve_named(tokenizer: Tokenizer, folder: Path, named: dict[str, str | None]) -> dict[str, int | None]:
    ids: dict[str, int | None] = {}
    for key, content in named.items():
        if content is None:
            ids[key] = None
            continue
        token_id = tokenizer.token_to_id(content)
        if token_id is None:
            raise ConfigError(
                f"{folder / TOKENIZER_CONFIG} (or {SPECIAL_TOKENS_MAP}) names {key} {content!r}, "
                f"which is not in the vocabulary of {tokenizer.source.name}"
            )
        ids[key] = token_id
    return ids


def _load_tokenizers_json(
    file: Path,
    named: dict[str, str | None],
    added_config: dict[int, tuple[str, bool]],
    extra_specials: list[str],
) -> Tokenizer:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    try:
        backend = RustTokenizer.from_file(str(file))
    except Exception as exc:  # the library raises a bare Exception for parse errors
        raise CheckpointError(
            f"{file} is not a valid tokenizers file ({exc}); re-download it (a Git LFS pointer "
            "or a truncated download looks like this)"
        ) from None
    tokenizer = _HFTokenizer(file, backend)

    # Tokens the configs call special but tokenizer.json does not mark as added tokens would
    # be split into pieces if they appear in text; register them (existing ids only).
    marked = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    wanted = [c for c in [*named.values(), *extra_specials] if c is not None]
    wanted += [content for _, (content, special) in sorted(added_config.items()) if special]
    missing = [c for c in dict.fromkeys(wanted) if c not in marked and backend.token_to_id(c) is not None]
    if missing:
        backend.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in missing])

    added = backend.get_added_tokens_decoder()
    tokenizer.vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
    ids = _resolve_named(tokenizer, file.parent, named)
    tokenizer.bos_token_id = ids.get("bos_token")
    tokenizer._tokenizer_eos_id = ids.get("eos_token")
    tokenizer.eos_token_ids = [] if ids.get("eos_token") is None else [ids["eos_token"]]
    tokenizer.pad_token_id = ids.get("pad_token")
    tokenizer.unk_token_id = ids.get("unk_token")

    special = {token_id for token_id, token in added.items() if token.special}
    special |= {i for i in ids.values() if i is not None}
    special |= {backend.token_to_id(c) for c in extra_specials if backend.token_to_id(c) is not None}
    special |= {i for i, (content, flag) in added_config.items() if flag and backend.token_to_id(content) == i}
    tokenizer._special_ids = frozenset(special)

    # What the post-processor adds around a short text tells add_bos / add_eos.
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    prefix, suffix = _affixes(full, plain)
    tokenizer.add_bos = bool(prefix)
    tokenizer.add_eos = bool(suffix)
    return tokenizer


def _affixes(full: list[int], plain: list[int]) -> tuple[list[int], list[int]]:
    """The ids ``full`` has before and after ``plain`` (what a post-processor wrapped around)."""
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return full[:1], []  # a post-processor that rewrites the ids; assume it prepends


def _load_sentencepiece(
    file: Path,
    named: dict[str, str | None],
    added_config: dict[int, tuple[str, bool]],
    extra_specials: list[str],
) -> Tokenizer:
    import sentencepiece

    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(file))
    except Exception as exc:  # RuntimeError / OSError from the C++ side
        raise CheckpointError(
            f"{file} is not a valid sentencepiece model ({exc}); re-download it (a Git LFS pointer "
            "or a truncated download looks like this)"
        ) from None
    tokenizer = _SentencePieceTokenizer(file, processor)
    pieces = tokenizer._piece_count

    for token_id, (content, _special) in added_config.items():
        tokenizer._added[token_id] = content
        tokenizer._added_ids[content] = token_id
    tokenizer.vocab_size = max(pieces, max(added_config, default=-1) + 1)

    # The model's own bos/eos/unk/pad pieces are the defaults the JSON configs may override.
    defaults = {
        "bos_token": processor.bos_id(),
        "eos_token": processor.eos_id(),
        "unk_token": processor.unk_id(),
        "pad_token": processor.pad_id(),
    }
    for key, model_id in defaults.items():
        if key not in named and 0 <= model_id < pieces:
            named[key] = processor.id_to_piece(model_id)
    ids = _resolve_named(tokenizer, file.parent, named)
    tokenizer.bos_token_id = ids.get("bos_token")
    tokenizer._tokenizer_eos_id = ids.get("eos_token")
    tokenizer.eos_token_ids = [] if ids.get("eos_token") is None else [ids["eos_token"]]
    tokenizer.pad_token_id = ids.get("pad_token")
    tokenizer.unk_token_id = ids.get("unk_token")

    special = {i for i in ids.values() if i is not None}
    special |= {i for i, (_, flag) in added_config.items() if flag}
    special |= {i for i in range(pieces) if processor.is_control(i) or processor.is_unknown(i)}
    for content in extra_specials:
        token_id = tokenizer.token_to_id(content)
        if token_id is not None:
            special.add(token_id)
    tokenizer._special_ids = frozenset(special)

    # Every special or added token's string maps to its id when it appears in text.
    no_split: dict[str, int] = {}
    for token_id in sorted(special):
        content = tokenizer._added.get(token_id) or processor.id_to_piece(token_id)
        no_split.setdefault(content, token_id)
    for content, token_id in tokenizer._added_ids.items():
        no_split.setdefault(content, token_id)
    tokenizer._set_no_split({c: i for c, i in no_split.items() if c})

    tokenizer.add_bos = tokenizer.bos_token_id is not None  # Llama 2 convention
    tokenizer.add_eos = False
    return tokenizer


def _config_flag(folder: Path, config: dict[str, Any], key: str) -> bool | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ConfigError(f"{folder / TOKENIZER_CONFIG}: {key} must be true or false, got {value!r}")
    return value


def _apply_flags(tokenizer: Tokenizer, folder: Path, config: dict[str, Any]) -> None:
    """Explicit add_bos_token / add_eos_token win over the format's default.

    For tokenizer.json this also switches encode() from the post-processor to adding the
    tokens ourselves; a flag the config leaves out keeps what the post-processor did.
    """
    add_bos = _config_flag(folder, config, "add_bos_token")
    add_eos = _config_flag(folder, config, "add_eos_token")
    if add_bos is None and add_eos is None:
        return
    if isinstance(tokenizer, _HFTokenizer):
        tokenizer._use_post_processor = False
        # From here on we prepend the BOS ourselves, so we need to know which id it is.
        tokenizer.add_bos = tokenizer.add_bos and tokenizer.bos_token_id is not None
    if add_bos is not None:
        if add_bos and tokenizer.bos_token_id is None:
            raise ConfigError(f"{folder / TOKENIZER_CONFIG} sets add_bos_token but names no bos_token")
        tokenizer.add_bos = add_bos
    if add_eos is not None:
        if add_eos and tokenizer._tokenizer_eos_id is None:
            raise ConfigError(f"{folder / TOKENIZER_CONFIG} sets add_eos_token but names no eos_token")
        tokenizer.add_eos = add_eos


def _generation_id(tokenizer: Tokenizer, file: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{file}: {key} must be an integer token id, got {value!r}")
    if not 0 <= value < tokenizer.vocab_size:
        raise ConfigError(f"{file}: {key} {value} is outside the vocabulary (vocab size {tokenizer.vocab_size})")
    return value


def _apply_generation_config(tokenizer: Tokenizer, folder: Path, generation: dict[str, Any]) -> None:
    """Stop ids: generation_config's eos list first, then the tokenizer's own eos.

    generation_config's bos_token_id is not used: Falcon's names <|endoftext|> there although
    its tokenizer never prepends a BOS.
    """
    file = folder / GENERATION_CONFIG
    raw = generation.get("eos_token_id")
    values = [] if raw is None else raw if isinstance(raw, list) else [raw]
    stop = [_generation_id(tokenizer, file, "eos_token_id", v) for v in values]
    for token_id in tokenizer.eos_token_ids:
        stop.append(token_id)
    tokenizer.eos_token_ids = list(dict.fromkeys(stop))
    tokenizer._special_ids = tokenizer._special_ids | frozenset(tokenizer.eos_token_ids)
    if tokenizer.pad_token_id is None and generation.get("pad_token_id") is not None:
        tokenizer.pad_token_id = _generation_id(tokenizer, file, "pad_token_id", generation["pad_token_id"])


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The string template; a named list yields its "default"; chat_template.jinja is the fallback."""
    value = config.get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, dict) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return entry["template"]
        return None
    if value is not None:
        raise ConfigError(f"{folder / TOKENIZER_CONFIG}: chat_template must be a string, got {type(value).__name__}")
    jinja = folder / CHAT_TEMPLATE_JINJA
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{jinja} is not UTF-8 text; re-download it") from None
    return None
