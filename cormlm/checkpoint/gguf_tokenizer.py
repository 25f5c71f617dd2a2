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

from ..errors import CheckpointError
from .tokenizer import Tokenizer, _HFTokenizer, _SentencePieceTokenizer

if TYPE_CHECKING:  # pragma: no cover
    import gguf

__all__ = ["SUPPORTED_PRE_TOKENIZERS", "tokenizer_from_gguf"]

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
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)


def _byte_level(use_regex: bool) -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _gpt2() -> tuple[Any, Any]:
    return None, _byte_level(use_regex=True)


def _digits_then_gpt2() -> tuple[Any, Any]:
    # StarCoder / SmolLM: every digit on its own, then GPT-2's regex.
    from tokenizers import pre_tokenizers

    return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)])


def _llama3() -> tuple[Any, Any]:
    from tokenizers import pre_tokenizers

    return None, pre_tokenizers.Sequence([_split(_LLAMA3_RE), _byte_level(False)])


def _qwen2() -> tuple[Any, Any]:
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.NFC(), pre_tokenizers.Sequence([_split(_QWEN2_RE), _byte_level(False)])


def _falcon() -> tuple[Any, Any]:
    # tiiuae/falcon-7b's tokenizer.json (llama.cpp's regexes omit the digit-run split).
    from tokenizers import pre_tokenizers

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
    from tokenizers import pre_tokenizers

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


class _Metadata:
    """Typed reads of a GGUF reader's key/value fields, with messages naming the file."""

    def __init__(self, reader: Any, source: Path) -> None:
        self._fields = reader.fields
        self.source = source

    def _raw(self, key: str) -> Any:
        field = self._fields.get(key)
        if field is None:
            return None
        try:
            return field.contents()
        except Exception as exc:  # a corrupt field
            raise CheckpointError(f"{self.source}: metadata key {key} cannot be read ({exc})") from None

    def _bad(self, key: str, what: str, value: Any) -> CheckpointError:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return CheckpointError(f"{self.source}: metadata key {key} must be {what}, got {shown}")

    def string(self, key: str) -> str | None:
        value = self._raw(key)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def flag(self, key: str) -> bool | None:
        value = self._raw(key)
        if value is not None and not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def integer(self, key: str) -> int | None:
        value = self._raw(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self._bad(key, "an integer", value)
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self._raw(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "an array of strings", value)
        return value

    def integers(self, key: str) -> list[int] | None:
        value = self._raw(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self._bad(key, "an array of integers", value)
        return value

    def floats(self, key: str) -> list[float] | None:
        value = self._raw(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise self._bad(key, "an array of numbers", value)
        return [float(v) for v in value]


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

    n = len(tokens)
    types = meta.integers("tokenizer.ggml.token_type")
    if types is None:
        types = [NORMAL] * n
    elif len(types) != n:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens; "
            "the file is inconsistent, re-convert or re-download it"
        )
    named: dict[str, int] = {}
    for suffix, name in _NAMED_IDS.items():
        key = f"tokenizer.ggml.{suffix}"
        value = meta.integer(key)
        if value is None:
            continue
        if not 0 <= value < n:
            raise CheckpointError(
                f"{source}: {key} is {value}, outside the vocabulary of {n} tokens (valid ids 0..{n - 1})"
            )
        named[name] = value

    if model == "gpt2":
        tokenizer, default_add_bos = _byte_level_bpe(meta, tokens, types, named)
    else:
        tokenizer, default_add_bos = _sentencepiece_bpe(meta, tokens, types, named)

    tokenizer.vocab_size = n
    tokenizer.bos_token_id = named.get("bos")
    tokenizer._tokenizer_eos_id = named.get("eos")
    stops = [named[k] for k in ("eos", "eot", "eom") if k in named]
    tokenizer.eos_token_ids = list(dict.fromkeys(stops))
    tokenizer.pad_token_id = named.get("pad")
    tokenizer.unk_token_id = named.get("unk")

    add_bos = meta.flag("tokenizer.ggml.add_bos_token")
    add_eos = meta.flag("tokenizer.ggml.add_eos_token")
    for flag, key, token_id in (
        (add_bos, "bos", tokenizer.bos_token_id),
        (add_eos, "eos", tokenizer._tokenizer_eos_id),
    ):
        if flag and token_id is None:
            raise CheckpointError(
                f"{source}: tokenizer.ggml.add_{key}_token is true but tokenizer.ggml.{key}_token_id is not set"
            )
    if add_bos is None:
        add_bos = default_add_bos and tokenizer.bos_token_id is not None
    tokenizer.add_bos = add_bos
    tokenizer.add_eos = bool(add_eos)
    tokenizer.chat_template = meta.string("tokenizer.chat_template")
    return tokenizer


def _special_ids(types: list[int], named: dict[str, int]) -> set[int]:
    """Control and unknown tokens plus every named id."""
    special = {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}
    special.update(named.values())
    return special


def _byte_level_bpe(
    meta: _Metadata, tokens: list[str], types: list[int], named: dict[str, int]
) -> tuple[Tokenizer, bool]:
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as RustTokenizer

    source = meta.source
    pre = meta.string("tokenizer.ggml.pre")
    pre = "default" if pre is None or pre == "" else pre
    style = SUPPORTED_PRE_TOKENIZERS.get(pre)
    if style is None:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.pre {pre!r} (the pre-tokenizer of this gpt2-style "
            f"vocabulary) is not supported; supported: {', '.join(sorted(SUPPORTED_PRE_TOKENIZERS))}"
        )
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
    backend = RustTokenizer(bpe)
    normalizer, pre_tokenizer = style.build()
    if normalizer is not None:
        backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()

    special = _special_ids(types, named)
    # Added tokens that are already in the vocabulary keep their ids.
    kept = [i for i, token in enumerate(tokens) if token and vocab[token] == i]
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in kept if i in special])
    backend.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i in kept
            if types[i] == USER_DEFINED and i not in special
        ]
    )

    tokenizer = _HFTokenizer(source, backend)
    tokenizer._use_post_processor = False  # BOS/EOS come from the GGUF flags
    tokenizer._special_ids = frozenset(special)
    return tokenizer, style.add_bos


# ---------------------------------------------------------- llama (sentencepiece)


def _sentencepiece_bpe(
    meta: _Metadata, tokens: list[str], types: list[int], named: dict[str, int]
) -> tuple[Tokenizer, bool]:
    import sentencepiece

    source = meta.source
    n = len(tokens)
    scores = meta.floats("tokenizer.ggml.scores")
    if scores is None:
        scores = [0.0] * n
    elif len(scores) != n:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens; "
            "the file is inconsistent, re-convert or re-download it"
        )
    add_space_prefix = meta.flag("tokenizer.ggml.add_space_prefix")
    if add_space_prefix is None:
        add_space_prefix = True  # llama.cpp's default for this tokenizer model

    # sentencepiece wants one unknown piece, unique non-empty pieces and known piece types.
    proto_types = [t if t in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL for t in types]
    unknown = [i for i, t in enumerate(proto_types) if t == UNKNOWN]
    if not unknown and "unk" in named:
        unknown = [named["unk"]]
        proto_types[named["unk"]] = UNKNOWN
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

    tokenizer = _SentencePieceTokenizer(source, processor)
    special = _special_ids(types, named) | set(unknown)
    # User-defined tokens are added tokens: matched whole in text, rendered from their
    # strings when decoding.  A repeated (or empty) string is only rendered; encoding finds
    # its first id, and "▁" reads as a space as in any other piece.
    for token_id, token in enumerate(tokens):
        if types[token_id] == USER_DEFINED and token_id not in stand_in:
            tokenizer._added[token_id] = token
            if token_id not in special:
                tokenizer._added_ids.setdefault(token, token_id)
        elif token_id in stand_in:
            tokenizer._added[token_id] = token if token_id in special else token.replace("\u2581", " ")
    tokenizer._special_ids = frozenset(special)
    no_split: dict[str, int] = {}
    for token_id in sorted(special):
        if tokens[token_id]:
            no_split.setdefault(tokens[token_id], token_id)
    for content, token_id in tokenizer._added_ids.items():
        no_split.setdefault(content, token_id)
    tokenizer._set_no_split(no_split)
    return tokenizer, True


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
