"""The tokenizer a GGUF file carries in its metadata (llama.cpp's ``tokenizer.*`` keys).

A GGUF file stores its vocabulary as plain arrays: ``tokenizer.ggml.tokens`` (the token
strings, index = id), ``tokenizer.ggml.token_type`` (1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte) and, by ``tokenizer.ggml.model``, either

* ``gpt2``: byte-level BPE with ``tokenizer.ggml.merges`` ("left right" strings) and a
  pre-tokenizer named by ``tokenizer.ggml.pre`` (llama.cpp's name for the regex pipeline of
  the original ``tokenizer.json``).  We rebuild it as a ``tokenizers`` BPE with the
  pre-tokenizer of the original model family (:data:`SUPPORTED_PRE_TOKENIZERS`).
* ``llama``: a sentencepiece BPE vocabulary (pieces with ``tokenizer.ggml.scores``, byte
  pieces ``<0x0A>``, "▁" for spaces).  We serialise it back into a sentencepiece model
  (identity normalisation, dummy prefix = ``tokenizer.ggml.add_space_prefix``) and let the
  ``sentencepiece`` library encode, so ids equal sentencepiece's on the original model
  when that normalises nothing (Llama 2 and its kin; GGUF keeps no normalisation rules,
  and llama.cpp applies none either).

Either way the result is the :class:`~cormlm.checkpoint.tokenizer.Tokenizer` a checkpoint
folder gives, over the same backends, with its :class:`SpecialTokens` read from the
``tokenizer.ggml.*_token_id`` and ``add_*_token`` keys (:func:`special_tokens_from_gguf`).

Choices where the metadata leaves room:

* Control, unknown and user-defined tokens (and the named bos/eos/... tokens) are matched
  whole wherever their strings appear in text, as llama.cpp does when it parses specials.
  For ``llama`` vocabularies the text between them is encoded piece by piece, each piece
  with its own dummy-prefix space (llama.cpp's and Meta's reference behaviour, and what
  :mod:`cormlm.checkpoint.tokenizer` does for tokenizer.model checkpoints).
* ``add_bos`` without ``tokenizer.ggml.add_bos_token``: llama.cpp's default, i.e. True for
  ``llama`` vocabularies and for the Llama 3 family of pre-tokenizers, False otherwise.
* Stop ids: ``eos_token_id``, then ``eot_token_id`` and ``eom_token_id`` when present.
* Where llama.cpp's regexes only approximate the original tokenizer.json (Falcon's digit
  handling, Qwen2's NFC normaliser) we follow the original tokenizer.json.
* A missing ``tokenizer.ggml.pre`` means llama.cpp's "default" pipeline, as in llama.cpp.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from ..errors import CheckpointError
from .tokenizer import SpecialTokens, Tokenizer, _RustBackend, _SentencePieceBackend

if TYPE_CHECKING:  # pragma: no cover
    import gguf

__all__ = ["SUPPORTED_PRE_TOKENIZERS", "special_tokens_from_gguf", "tokenizer_from_gguf"]

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type; sentencepiece uses the same numbers).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_MODELS = ("gpt2", "llama")

# Named special ids: GGUF key suffix -> our name.
_NAMED_IDS = {
    "bos_token_id": "bos",
    "eos_token_id": "eos",
    "unknown_token_id": "unk",
    "padding_token_id": "pad",
    "eot_token_id": "eot",
    "eom_token_id": "eom",
}

# --------------------------------------------------------------- pre-tokenizers

# GPT-2's split regex (what ByteLevel(use_regex=True) applies).
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's (tokenizer.json spelling; llama.cpp spells the case-insensitive group out).
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: Llama 3's with single digits.
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizerStyle:
    """How one family of ``tokenizer.ggml.pre`` values splits text before BPE."""

    build: Callable[[], tuple[Any, Any]]  # -> (normalizer or None, pre_tokenizer)
    ignore_merges: bool = False  # a whole pre-token that is in the vocabulary is one token
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


def _split(pattern: str) -> Any:
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)


def _byte_level(use_regex: bool) -> Any:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _gpt2() -> tuple[Any, Any]:
    return None, _byte_level(use_regex=True)


def _digits_then_gpt2() -> tuple[Any, Any]:
    # StarCoder / SmolLM: every digit on its own, then GPT-2's regex.
    return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)])


def _llama3() -> tuple[Any, Any]:
    return None, pre_tokenizers.Sequence([_split(_LLAMA3_RE), _byte_level(False)])


def _qwen2() -> tuple[Any, Any]:
    return normalizers.NFC(), pre_tokenizers.Sequence([_split(_QWEN2_RE), _byte_level(False)])


def _falcon() -> tuple[Any, Any]:
    # tiiuae/falcon-7b's tokenizer.json (llama.cpp's regexes omit the digit-run split).
    return None, pre_tokenizers.Sequence(
        [
            pre_tokenizers.Punctuation(behavior="contiguous"),
            _byte_level(True),
            pre_tokenizers.Digits(individual_digits=False),
            _split("[0-9][0-9][0-9]"),
        ]
    )


def _llama_cpp_default() -> tuple[Any, Any]:
    # llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT: its regexes applied in turn, each to the
    # pieces of the previous one, on the raw text; bytes are mapped afterwards.
    return None, pre_tokenizers.Sequence(
        [
            _split(r"[\p{P}\$\+<=>\^~\|]+"),
            _split(_GPT2_RE),
            _split(r"\p{N}+"),
            _split("[0-9][0-9][0-9]"),
            _byte_level(False),
        ]
    )


_GPT2_STYLE = _PreTokenizerStyle(_gpt2)
_DIGITS_STYLE = _PreTokenizerStyle(_digits_then_gpt2)
_LLAMA3_STYLE = _PreTokenizerStyle(_llama3, ignore_merges=True, add_bos=True)

# tokenizer.ggml.pre value -> style; the names are llama.cpp's (src/llama-vocab.cpp).
SUPPORTED_PRE_TOKENIZERS: dict[str, _PreTokenizerStyle] = {
    "default": _PreTokenizerStyle(_llama_cpp_default),
    # GPT-2 regex
    "gpt-2": _GPT2_STYLE,
    "gpt2": _GPT2_STYLE,  # not a llama.cpp name; accepted as "gpt-2"
    "phi-2": _GPT2_STYLE,
    "mpt": _GPT2_STYLE,
    "olmo": _GPT2_STYLE,
    "jais": _GPT2_STYLE,
    # single digits, then GPT-2 regex
    "smollm": _DIGITS_STYLE,
    "starcoder": _DIGITS_STYLE,
    "refact": _DIGITS_STYLE,
    "codeshell": _DIGITS_STYLE,
    "command-r": _DIGITS_STYLE,
    "exaone": _DIGITS_STYLE,
    "minerva-7b": _DIGITS_STYLE,
    # Llama 3 regex
    "llama3": _LLAMA3_STYLE,
    "llama-v3": _LLAMA3_STYLE,
    "llama-bpe": _LLAMA3_STYLE,
    "falcon3": _LLAMA3_STYLE,
    "dbrx": _PreTokenizerStyle(_llama3),
    "smaug-bpe": _PreTokenizerStyle(_llama3),
    # Qwen2 regex (+ NFC)
    "qwen2": _PreTokenizerStyle(_qwen2),
    "deepseek-r1-qwen": _PreTokenizerStyle(_qwen2),
    # Falcon
    "falcon": _PreTokenizerStyle(_falcon),
}


# ------------------------------------------------------------------ metadata


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _array_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(map(check, value))


class _Metadata:
    """Typed reads of a GGUF reader's key/value fields, with messages naming the file."""

    def __init__(self, reader: Any, source: Path) -> None:
        self._fields = reader.fields
        self.source = source

    def _read(self, key: str, what: str, check: Callable[[Any], bool]) -> Any:
        field = self._fields.get(key)
        if field is None:
            return None
        try:
            value = field.contents()
        except Exception as exc:  # a corrupt field
            raise CheckpointError(f"{self.source}: metadata key {key} cannot be read ({exc})") from None
        if not check(value):
            shown = repr(value)
            shown = shown[:77] + "..." if len(shown) > 80 else shown
            raise CheckpointError(f"{self.source}: metadata key {key} must be {what}, got {shown}")
        return value

    def string(self, key: str) -> str | None:
        return self._read(key, "a string", lambda value: isinstance(value, str))

    def flag(self, key: str) -> bool | None:
        return self._read(key, "true or false", lambda value: isinstance(value, bool))

    def integer(self, key: str) -> int | None:
        return self._read(key, "an integer", _is_int)

    def strings(self, key: str) -> list[str] | None:
        return self._read(key, "an array of strings", _array_of(lambda value: isinstance(value, str)))

    def integers(self, key: str) -> list[int] | None:
        return self._read(key, "an array of integers", _array_of(_is_int))

    def floats(self, key: str) -> list[float] | None:
        value = self._read(key, "an array of numbers", _array_of(_is_number))
        return None if value is None else [float(v) for v in value]

    def per_token(self, read: Callable[[str], list[Any] | None], key: str, n: int, default: Any) -> list[Any]:
        """The array ``read`` finds at ``key``, one entry per token (``default`` each when absent)."""
        value = read(key)
        if value is None:
            return [default] * n
        if len(value) != n:
            raise CheckpointError(
                f"{self.source}: {key} has {len(value)} entries for {n} tokens; "
                "the file is inconsistent, re-convert or re-download it"
            )
        return value


# ------------------------------------------------------------------- loading


def tokenizer_from_gguf(reader: gguf.GGUFReader, source: Path) -> Tokenizer:
    """The tokenizer stored in the metadata of an opened GGUF file.

    ``reader`` is a ``gguf.GGUFReader`` of ``source`` (the path is for messages and repr).
    Raises :class:`CheckpointError` when the file carries no tokenizer or one we cannot
    rebuild exactly.
    """
    source = Path(source)
    meta = _Metadata(reader, source)
    model = meta.string("tokenizer.ggml.model")
    tokens = meta.strings("tokenizer.ggml.tokens")
    if model is None or not tokens:
        missing = "tokenizer.ggml.model" if model is None else "tokenizer.ggml.tokens"
        raise CheckpointError(
            f"this GGUF file carries no tokenizer ({source} has no {missing} in its metadata); "
            "load the tokenizer from the original checkpoint folder (tokenizer.json or "
            "tokenizer.model) instead"
        )
    if model not in SUPPORTED_MODELS:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model {model!r} is not supported; supported tokenizer "
            f"models: {', '.join(SUPPORTED_MODELS)}"
        )
    types = meta.per_token(meta.integers, "tokenizer.ggml.token_type", len(tokens), NORMAL)
    if model == "gpt2":
        style = _pre_tokenizer_style(meta)
        specials = special_tokens_from_gguf(meta, types, default_add_bos=style.add_bos)
        return Tokenizer(_byte_level_bpe(meta, tokens, types, specials, style), specials)
    specials = special_tokens_from_gguf(meta, types, default_add_bos=True)
    return Tokenizer(_sentencepiece_bpe(meta, tokens, types, specials), specials)


def special_tokens_from_gguf(meta: _Metadata, types: list[int], default_add_bos: bool) -> SpecialTokens:
    """The named ids and flags of the metadata; ``default_add_bos`` is llama.cpp's for this vocabulary."""
    n = len(types)
    named: dict[str, int] = {}
    for suffix, name in _NAMED_IDS.items():
        key = f"tokenizer.ggml.{suffix}"
        value = meta.integer(key)
        if value is None:
            continue
        if not 0 <= value < n:
            raise CheckpointError(
                f"{meta.source}: {key} is {value}, outside the vocabulary of {n} tokens (valid ids 0..{n - 1})"
            )
        named[name] = value
    add_bos = meta.flag("tokenizer.ggml.add_bos_token")
    add_eos = meta.flag("tokenizer.ggml.add_eos_token")
    for flag, key in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and key not in named:
            raise CheckpointError(
                f"{meta.source}: tokenizer.ggml.add_{key}_token is true but tokenizer.ggml.{key}_token_id is not set"
            )
    return SpecialTokens(
        bos_id=named.get("bos"),
        eos_id=named.get("eos"),
        stop_ids=tuple(dict.fromkeys(named[k] for k in ("eos", "eot", "eom") if k in named)),
        pad_id=named.get("pad"),
        unk_id=named.get("unk"),
        add_bos=add_bos if add_bos is not None else default_add_bos and "bos" in named,
        add_eos=bool(add_eos),
        # Control and unknown tokens plus every named id.
        special_ids=frozenset({i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)} | set(named.values())),
        chat_template=meta.string("tokenizer.chat_template"),
    )


def _pre_tokenizer_style(meta: _Metadata) -> _PreTokenizerStyle:
    pre = meta.string("tokenizer.ggml.pre") or "default"
    style = SUPPORTED_PRE_TOKENIZERS.get(pre)
    if style is None:
        raise CheckpointError(
            f"{meta.source}: tokenizer.ggml.pre {pre!r} (the pre-tokenizer of this gpt2-style "
            f"vocabulary) is not supported; supported: {', '.join(sorted(SUPPORTED_PRE_TOKENIZERS))}"
        )
    return style


def _byte_level_bpe(
    meta: _Metadata, tokens: list[str], types: list[int], specials: SpecialTokens, style: _PreTokenizerStyle
) -> _RustBackend:
    source = meta.source
    raw_merges = meta.strings("tokenizer.ggml.merges")
    if not raw_merges:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model is 'gpt2' (byte-level BPE) but tokenizer.ggml.merges "
            "is missing or empty; the file is incomplete, re-convert or re-download it"
        )
    merges: list[tuple[str, str]] = []
    for index, merge in enumerate(raw_merges):
        # As llama.cpp: the first space after the first character separates the two parts.
        cut = merge.find(" ", 1)
        if cut < 0:
            raise CheckpointError(
                f"{source}: tokenizer.ggml.merges[{index}] is {merge!r}, not two tokens separated by a space"
            )
        merges.append((merge[:cut], merge[cut + 1 :]))

    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)  # a repeated string keeps its first id
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=style.ignore_merges, fuse_unk=False)
    except Exception as exc:  # the library raises a bare Exception for a merge of unknown tokens
        raise CheckpointError(
            f"{source}: tokenizer.ggml.merges does not fit tokenizer.ggml.tokens ({exc}); "
            "the file is inconsistent, re-convert or re-download it"
        ) from None
    rust = RustTokenizer(bpe)
    normalizer, pre_tokenizer = style.build()
    if normalizer is not None:
        rust.normalizer = normalizer
    rust.pre_tokenizer = pre_tokenizer
    rust.decoder = decoders.ByteLevel()

    # Added tokens that are already in the vocabulary keep their ids.
    special = specials.special_ids
    kept = [i for i, token in enumerate(tokens) if token and vocab[token] == i]
    rust.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in kept if i in special])
    user = [i for i in kept if types[i] == USER_DEFINED and i not in special]
    rust.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    return _RustBackend(source, rust, vocab_size=len(tokens))


# ---------------------------------------------------------- llama (sentencepiece)


def _sentencepiece_bpe(
    meta: _Metadata, tokens: list[str], types: list[int], specials: SpecialTokens
) -> _SentencePieceBackend:
    source = meta.source
    scores = meta.per_token(meta.floats, "tokenizer.ggml.scores", len(tokens), 0.0)
    add_space_prefix = meta.flag("tokenizer.ggml.add_space_prefix")
    if add_space_prefix is None:
        add_space_prefix = True  # llama.cpp's default for this tokenizer model

    # sentencepiece wants one unknown piece, unique non-empty pieces and known piece types.
    proto_types = [t if t in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL for t in types]
    unknown = [i for i, t in enumerate(proto_types) if t == UNKNOWN]
    if not unknown and specials.unk_id is not None:
        unknown = [specials.unk_id]
        proto_types[specials.unk_id] = UNKNOWN
    if not unknown:
        raise CheckpointError(
            f"{source}: this llama-style (sentencepiece) vocabulary has no unknown token (token type 2 "
            "or tokenizer.ggml.unknown_token_id); sentencepiece cannot use it"
        )
    for extra in unknown[1:]:
        proto_types[extra] = CONTROL
    pieces = list(tokens)
    stand_in: dict[int, str] = {}  # ids whose string cannot be a sentencepiece piece
    seen: set[str] = set()
    for token_id, token in enumerate(tokens):
        if not token or token in seen:
            stand_in[token_id] = token
            pieces[token_id] = f"<cormlm:stand-in:{token_id}>"
            if proto_types[token_id] != UNKNOWN:
                proto_types[token_id] = UNUSED
        seen.add(token)

    model = _sentencepiece_model_proto(
        pieces,
        scores,
        proto_types,
        unk_id=unknown[0],
        byte_fallback=BYTE in proto_types,
        add_dummy_prefix=add_space_prefix,
    )
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    except Exception as exc:  # RuntimeError from the C++ side
        raise CheckpointError(
            f"{source}: the llama-style (sentencepiece) vocabulary is not usable ({exc}); "
            "re-convert or re-download the file"
        ) from None

    # User-defined tokens are added tokens: matched whole in text, rendered from their
    # strings when decoding.  A repeated (or empty) string is only rendered; encoding finds
    # its first id, and "▁" reads as a space as in any other piece.
    special = specials.special_ids
    added: dict[int, str] = {}
    added_ids: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        if types[token_id] == USER_DEFINED and token_id not in stand_in:
            added[token_id] = token
            if token_id not in special:
                added_ids.setdefault(token, token_id)
        elif token_id in stand_in:
            added[token_id] = token if token_id in special else token.replace("\u2581", " ")
    return _SentencePieceBackend(source, processor, added, added_ids, whole=special)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values take ten bytes, as protobuf writes them
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _pb_int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _pb_float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _sentencepiece_model_proto(
    pieces: list[str],
    scores: list[float],
    types: list[int],
    *,
    unk_id: int,
    byte_fallback: bool,
    add_dummy_prefix: bool,
) -> bytes:
    """A serialized sentencepiece ``ModelProto`` (src/sentencepiece_model.proto): a BPE model
    with identity normalisation, written by hand so that protobuf is not needed."""
    out = bytearray()
    for piece, score, kind in zip(pieces, scores, types):
        body = _pb_bytes(1, piece.encode("utf-8")) + _pb_float(2, score) + _pb_int(3, kind)
        out += _pb_bytes(1, body)  # ModelProto.pieces
    trainer = (
        _pb_int(3, 2)  # model_type = BPE
        + _pb_int(4, len(pieces))  # vocab_size
        + _pb_int(35, int(byte_fallback))
        + _pb_int(40, unk_id)
        + _pb_int(41, -1)  # bos/eos/pad: we keep those ids ourselves
        + _pb_int(42, -1)
        + _pb_int(43, -1)
    )
    out += _pb_bytes(2, trainer)
    normalizer = (
        _pb_bytes(1, b"identity")
        + _pb_int(3, int(add_dummy_prefix))
        + _pb_int(4, 0)  # remove_extra_whitespaces
        + _pb_int(5, 1)  # escape_whitespaces
    )
    out += _pb_bytes(3, normalizer)
    return bytes(out)
