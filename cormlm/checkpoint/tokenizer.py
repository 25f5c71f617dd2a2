"""One tokenizer interface over the two formats Hugging Face checkpoints ship.

A checkpoint folder holds either ``tokenizer.json`` (the Rust ``tokenizers`` format: Llama 3,
Mistral, Falcon, converted Llama 2) or only ``tokenizer.model`` (a ``sentencepiece`` model:
older Llama 2 conversions).  Neither file alone says everything inference needs: which
special tokens exist, whether a prompt starts with BOS, and which ids end generation are
spread over ``tokenizer_config.json``, ``special_tokens_map.json`` and
``generation_config.json``.  :func:`special_tokens_from_folder` resolves all of that once into
a frozen :class:`SpecialTokens`, and :class:`Tokenizer` is a thin adapter that answers with
plain ids, so model code never has to know the format.  GGUF files build the same record and
the same class (:mod:`cormlm.checkpoint.gguf_tokenizer`).

Choices where the checkpoint files leave room:

* ``tokenizer_config.json`` wins over ``special_tokens_map.json`` for a token named in both
  (the latter is the legacy file; transformers reads it only when the config has no
  ``added_tokens_decoder``).
* Explicit ``add_bos_token`` / ``add_eos_token`` are honoured for tokenizer.json too (as
  transformers 4 did; transformers 5 drops them when tokenizer.json exists); a flag left out
  keeps what the tokenizer.json post-processor does.
* Stop ids: generation_config.json's ``eos_token_id`` (one id or a list) first, then the
  tokenizer's own EOS; its ``pad_token_id`` only when the configs name no pad token; its
  ``bos_token_id`` never (Falcon's names <|endoftext|> although nothing prepends it).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError, InputError
from .hf_config import token_ids
from .jsonfiles import read_optional_json

__all__ = ["SpecialTokens", "Tokenizer", "load_tokenizer_from_folder"]

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"

_NAMED_SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclass(frozen=True)
class SpecialTokens:
    """A checkpoint's special tokens, resolved once from its files so nothing changes them later."""

    bos_id: int | None = None
    eos_id: int | None = None  # the tokenizer's own EOS: what add_eos appends
    stop_ids: tuple[int, ...] = ()  # every id that ends generation, the preferred one first
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    # True: tokenizer.json's post-processor adds what it adds (add_bos/add_eos only report it).
    post_processor: bool = False
    # What the tokenizer files call special (matched whole in text); stop ids are special too.
    special_ids: frozenset[int] = frozenset()
    chat_template: str | None = None


def _view(field: str) -> Any:
    """A read-only Tokenizer attribute that reads its SpecialTokens."""
    return property(lambda self: getattr(self.specials, field))


class Tokenizer:
    """Plain ids and text over a ``tokenizers`` or ``sentencepiece`` backend and a :class:`SpecialTokens`.

    Build it with :func:`cormlm.load_tokenizer`; the public attributes are read-only views
    of ``specials``.
    """

    bos_token_id: int | None = _view("bos_id")
    pad_token_id: int | None = _view("pad_id")
    unk_token_id: int | None = _view("unk_id")
    add_bos: bool = _view("add_bos")
    add_eos: bool = _view("add_eos")
    chat_template: str | None = _view("chat_template")

    def __init__(self, backend: _RustBackend | _SentencePieceBackend, specials: SpecialTokens) -> None:
        self._backend = backend
        self._specials = specials
        self._special = specials.special_ids | frozenset(specials.stop_ids)

    @property
    def specials(self) -> SpecialTokens:
        return self._specials

    @property
    def source(self) -> Path:
        """The file the vocabulary came from, for messages and repr."""
        return self._backend.source

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        """Every stop id (Llama 3 has several); a copy."""
        return list(self.specials.stop_ids)

    @property
    def eos_token_id(self) -> int | None:
        """The first stop id, for callers that want a single one (e.g. as a pad fallback)."""
        return self.specials.stop_ids[0] if self.specials.stop_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` BOS/EOS as the checkpoint asks."""
        if not isinstance(text, str):
            raise InputError(f"encode() takes a str, got {type(text).__name__}")
        try:
            if add_special_tokens and self.specials.post_processor:
                return self._backend.encode(text, post_process=True)
            ids = self._backend.encode(text)
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
        s = self.specials
        if add_special_tokens and s.add_bos and s.bos_id is not None:
            ids = [s.bos_id, *ids]
        if add_special_tokens and s.add_eos and s.eos_id is not None:
            ids = [*ids, s.eos_id]
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is False."""
        return self._backend.decode(self._check_ids(ids), self._special, skip_special_tokens)

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
        return self._backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special token (BOS, EOS, pad, unk, special added tokens)."""
        try:
            return operator.index(token_id) in self._special  # also 0-d tensors, numpy ints
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
            if not 0 <= token_id < self.vocab_size or not self._backend.has_id(token_id):
                raise InputError(
                    f"token id {token_id} is outside the vocabulary of {self.source.name} "
                    f"(vocab size {self.vocab_size}, valid ids 0..{self.vocab_size - 1})"
                )
            out.append(token_id)
        return out


# ---------------------------------------------------------------------- backends


class _RustBackend:
    """A ``tokenizers.Tokenizer`` (tokenizer.json, or a GGUF gpt2 vocabulary rebuilt)."""

    def __init__(self, source: Path, rust: Any, vocab_size: int | None = None) -> None:
        self.source = source
        self._rust = rust
        # Added-token ids may lie past get_vocab_size() when they leave gaps.
        top = max(rust.get_added_tokens_decoder(), default=-1) + 1
        self.vocab_size = vocab_size if vocab_size is not None else max(rust.get_vocab_size(with_added_tokens=True), top)

    def encode(self, text: str, post_process: bool = False) -> list[int]:
        return list(self._rust.encode(text, add_special_tokens=post_process).ids)

    def decode(self, ids: list[int], special: frozenset[int], skip_special_tokens: bool) -> str:
        # Filter with our own notion of special (it also covers tokens that only the JSON
        # configs call special), then let the library's decoder join the rest.
        if skip_special_tokens:
            ids = [i for i in ids if i not in special]
        return self._rust.decode(ids, skip_special_tokens=False)

    def has_id(self, token_id: int) -> bool:
        return self._rust.id_to_token(token_id) is not None

    def token_to_id(self, token: str) -> int | None:
        return self._rust.token_to_id(token)

    def default_names(self) -> dict[str, str]:
        return {}  # tokenizer.json names no bos/eos; the JSON configs do

    def marked_special_ids(self) -> set[int]:
        return {i for i, token in self._rust.get_added_tokens_decoder().items() if token.special}

    def post_processor_adds(self) -> tuple[bool, bool] | None:
        """Whether the post-processor puts ids before / after a short text."""
        plain = self._rust.encode("a", add_special_tokens=False).ids
        full = self._rust.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return bool(start), start + len(plain) < len(full)
        return bool(full), False  # a post-processor that rewrites the ids; assume it prepends


class _SentencePieceBackend:
    """A ``sentencepiece`` model plus added tokens, whose strings are matched whole in text.

    ``added`` maps ids to the strings they render as (overriding the model's piece),
    ``added_ids`` strings to ids for lookups, and the strings of ``whole`` ids and of
    ``added_ids`` are cut out of text before sentencepiece sees it, longest first.
    """

    def __init__(
        self,
        source: Path,
        processor: Any,
        added: dict[int, str],
        added_ids: dict[str, int],
        whole: Iterable[int] = (),
    ) -> None:
        self.source = source
        self._sp = processor
        self._pieces: int = processor.get_piece_size()
        self._added = added
        self._added_ids = added_ids
        self.vocab_size = max(self._pieces, max(added, default=-1) + 1)
        matched: dict[str, int] = {}
        for token_id in sorted(whole):
            matched.setdefault(added[token_id] if token_id in added else processor.id_to_piece(token_id), token_id)
        for content, token_id in added_ids.items():
            matched.setdefault(content, token_id)
        self._whole = {content: token_id for content, token_id in matched.items() if content}
        alternatives = sorted(self._whole, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    def matching(self, whole: Iterable[int]) -> _SentencePieceBackend:
        """This backend, also cutting out the strings of ``whole`` (known only after lookups)."""
        return _SentencePieceBackend(self.source, self._sp, self._added, self._added_ids, whole)

    def encode(self, text: str, post_process: bool = False) -> list[int]:
        """Ids without BOS/EOS (sentencepiece has no post-processor; SpecialTokens says what to add)."""
        ids: list[int] = []
        chunks = self._split.split(text) if self._split is not None else [text]
        # re.split with one capturing group alternates: text, match, text, match, ...
        for index, chunk in enumerate(chunks):
            if index % 2:
                ids.append(self._whole[chunk])
            elif chunk:
                ids.extend(self._sp.encode(chunk, out_type=int))
        return ids

    def decode(self, ids: list[int], special: frozenset[int], skip_special_tokens: bool) -> str:
        # Runs of ordinary pieces go to sentencepiece (which merges byte-fallback pieces and
        # strips the dummy-prefix space once per run, mirroring encode's per-chunk calls);
        # special and added tokens are rendered from their strings.
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self._added or token_id in special:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                if not (skip_special_tokens and token_id in special):
                    content = self._added.get(token_id)
                    parts.append(self._sp.id_to_piece(token_id) if content is None else content)
            else:
                run.append(token_id)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def has_id(self, token_id: int) -> bool:
        return token_id < self._pieces or token_id in self._added

    def token_to_id(self, token: str) -> int | None:
        if token in self._added_ids:
            return self._added_ids[token]
        token_id = self._sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces; only "<unk>" itself should map there.
        if token_id < 0 or self._sp.id_to_piece(token_id) != token:
            return None
        return token_id

    def default_names(self) -> dict[str, str]:
        """The model's own bos/eos/unk/pad pieces: the defaults the JSON configs may override."""
        sp = self._sp
        ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
        return {key: sp.id_to_piece(i) for key, i in ids.items() if 0 <= i < self._pieces}

    def marked_special_ids(self) -> set[int]:
        return {i for i in range(self._pieces) if self._sp.is_control(i) or self._sp.is_unknown(i)}

    def post_processor_adds(self) -> tuple[bool, bool] | None:
        return None  # we add BOS/EOS ourselves


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
    files = _FolderFiles.read(path)
    backend: _RustBackend | _SentencePieceBackend
    if (path / TOKENIZER_JSON).is_file():
        backend = _load_tokenizers_json(path / TOKENIZER_JSON, files)
    elif (path / TOKENIZER_MODEL).is_file():
        backend = _load_sentencepiece(path / TOKENIZER_MODEL, files)
    else:
        raise CheckpointError(
            f"{path} holds no tokenizer: expected {TOKENIZER_JSON} or {TOKENIZER_MODEL}; "
            "copy the tokenizer files of the checkpoint into the folder"
        )
    specials = special_tokens_from_folder(path, files, backend)
    if isinstance(backend, _SentencePieceBackend):
        backend = backend.matching(specials.special_ids)
    return Tokenizer(backend, specials)


@dataclass(frozen=True)
class _FolderFiles:
    """The checked JSON configs of a folder: the token names and flags they set."""

    config: dict[str, Any]  # tokenizer_config.json
    generation: dict[str, Any]  # generation_config.json
    names: dict[str, str | None]  # bos_token ... unk_token, tokenizer_config.json over special_tokens_map.json
    added: dict[int, tuple[str, bool]]  # added_tokens_decoder: id -> (content, special)
    extras: list[str]  # additional_special_tokens (v5: extra_special_tokens)

    @classmethod
    def read(cls, folder: Path) -> _FolderFiles:
        config = read_optional_json(folder / TOKENIZER_CONFIG)
        special_map = read_optional_json(folder / SPECIAL_TOKENS_MAP)
        generation = read_optional_json(folder / GENERATION_CONFIG)
        sources = ((folder / TOKENIZER_CONFIG, config), (folder / SPECIAL_TOKENS_MAP, special_map))
        names: dict[str, str | None] = {}
        for key in _NAMED_SPECIALS:
            for file, data in sources:
                if key in data:
                    names[key] = _token_string(file, key, data[key])
                    break
        extras: list[str] = []
        for file, data in sources:
            for key in ("additional_special_tokens", "extra_special_tokens"):
                values = data.get(key) or []
                if isinstance(values, dict):  # v5 allows {"name": token}
                    values = list(values.values())
                if not isinstance(values, list):
                    raise ConfigError(f"{file}: {key} must be a list of tokens, got {type(values).__name__}")
                for content in (_token_string(file, key, value) for value in values):
                    if content is not None and content not in extras:
                        extras.append(content)
        return cls(config, generation, names, _config_added_tokens(folder / TOKENIZER_CONFIG, config), extras)


def _token_string(file: Path, key: str, value: Any) -> str | None:
    """A special token entry is a string, a dict with "content" (an AddedToken), or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    raise ConfigError(f"{file}: {key} must be a string or an object with a string \"content\", got {value!r}")


def _config_added_tokens(file: Path, config: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    """tokenizer_config.json "added_tokens_decoder": id -> (content, special)."""
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
        added[token_id] = (content, bool(value.get("special", False)) if isinstance(value, dict) else False)
    return added


def _load_tokenizers_json(file: Path, files: _FolderFiles) -> _RustBackend:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    try:
        rust = RustTokenizer.from_file(str(file))
    except Exception as exc:  # the library raises a bare Exception for parse errors
        raise CheckpointError(
            f"{file} is not a valid tokenizers file ({exc}); re-download it (a Git LFS pointer "
            "or a truncated download looks like this)"
        ) from None
    # Tokens the configs call special but tokenizer.json does not mark as added tokens would
    # be split into pieces if they appear in text; register them (existing ids only).
    marked = {t.content for t in rust.get_added_tokens_decoder().values() if t.special}
    wanted = [c for c in files.names.values() if c is not None] + files.extras
    wanted += [content for _, (content, special) in sorted(files.added.items()) if special]
    missing = [c for c in dict.fromkeys(wanted) if c not in marked and rust.token_to_id(c) is not None]
    if missing:
        rust.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in missing])
    return _RustBackend(file, rust)


def _load_sentencepiece(file: Path, files: _FolderFiles) -> _SentencePieceBackend:
    import sentencepiece

    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(file))
    except Exception as exc:  # RuntimeError / OSError from the C++ side
        raise CheckpointError(
            f"{file} is not a valid sentencepiece model ({exc}); re-download it (a Git LFS pointer "
            "or a truncated download looks like this)"
        ) from None
    added = {token_id: content for token_id, (content, _) in files.added.items()}
    return _SentencePieceBackend(file, processor, added, {content: i for i, content in added.items()})


def special_tokens_from_folder(
    folder: Path, files: _FolderFiles, backend: _RustBackend | _SentencePieceBackend
) -> SpecialTokens:
    """The folder's special tokens: the configs' names resolved in ``backend``, their flags checked."""
    ids: dict[str, int | None] = {}
    for key, content in {**backend.default_names(), **files.names}.items():
        ids[key] = None if content is None else backend.token_to_id(content)
        if content is not None and ids[key] is None:
            raise ConfigError(
                f"{folder / TOKENIZER_CONFIG} (or {SPECIAL_TOKENS_MAP}) names {key} {content!r}, "
                f"which is not in the vocabulary of {backend.source.name}"
            )
    bos, eos = ids.get("bos_token"), ids.get("eos_token")
    special = backend.marked_special_ids() | {i for i in ids.values() if i is not None}
    special |= {i for i in map(backend.token_to_id, files.extras) if i is not None}
    special |= {i for i, (content, flag) in files.added.items() if flag and backend.token_to_id(content) == i}

    adds = backend.post_processor_adds()
    add_bos, add_eos = adds if adds is not None else (bos is not None, False)  # Llama 2's convention
    post_processor = adds is not None
    flag_bos, flag_eos = (_config_flag(folder, files.config, f"add_{key}_token") for key in ("bos", "eos"))
    if flag_bos is not None or flag_eos is not None:
        # Explicit flags: we add the tokens ourselves, so BOS needs a known id.
        post_processor, add_bos = False, add_bos and bos is not None
    for flag, key, token_id in ((flag_bos, "bos", bos), (flag_eos, "eos", eos)):
        if flag and token_id is None:
            raise ConfigError(f"{folder / TOKENIZER_CONFIG} sets add_{key}_token but names no {key}_token")
    add_bos = add_bos if flag_bos is None else flag_bos
    add_eos = add_eos if flag_eos is None else flag_eos

    generation, vocab_size = files.generation, backend.vocab_size
    stops = token_ids(generation.get("eos_token_id"), "eos_token_id", str(folder / GENERATION_CONFIG), vocab_size)
    pad = ids.get("pad_token")
    if pad is None and generation.get("pad_token_id") is not None:
        (pad,) = token_ids(generation["pad_token_id"], "pad_token_id", str(folder / GENERATION_CONFIG), vocab_size)
    return SpecialTokens(
        bos_id=bos,
        eos_id=eos,
        stop_ids=tuple(dict.fromkeys(stops if eos is None else [*stops, eos])),
        pad_id=pad,
        unk_id=ids.get("unk_token"),
        add_bos=add_bos,
        add_eos=add_eos,
        post_processor=post_processor,
        special_ids=frozenset(special),
        chat_template=_chat_template(folder, files.config),
    )


def _config_flag(folder: Path, config: dict[str, Any], key: str) -> bool | None:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{folder / TOKENIZER_CONFIG}: {key} must be true or false, got {value!r}")
    return value


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
