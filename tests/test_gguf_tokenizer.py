"""Tests of cormlm.checkpoint.gguf_tokenizer: tokenizers rebuilt from GGUF metadata.

GGUF files are written here with ``gguf.GGUFWriter`` (tokenizer metadata plus one tiny
tensor) from tokenizers trained here, and read back with ``gguf.GGUFReader``:

* byte-level BPE (``tokenizer.ggml.model = gpt2``), trained with ``tokenizers``; the oracle
  for each ``tokenizer.ggml.pre`` is the trained tokenizer fed with the pieces of llama.cpp's
  regexes for that value (written out below with the ``regex`` module), and for "smollm" and
  "falcon" also the original models' tokenizer.json pre-tokenizers;
* sentencepiece BPE (``tokenizer.ggml.model = llama``), trained with Llama 2's options; the
  oracle is ``sentencepiece`` on the trained model.

The real SmolLM2-135M-Instruct GGUF is compared with transformers' own GGUF tokenizer.
"""

from __future__ import annotations

import inspect
import io
import unicodedata
from pathlib import Path

import pytest
from checkpoints import LLAMA2_SENTENCEPIECE_OPTIONS

from cormlm.checkpoint.gguf_tokenizer import SUPPORTED_PRE_TOKENIZERS, tokenizer_from_gguf
from cormlm.checkpoint.tokenizer import SpecialTokens, Tokenizer
from cormlm.errors import CheckpointError

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TOOL = "<tool>"  # a user-defined (non-special) token

SAMPLES = [
    "Hello world",
    "def f(x):\n    return x + 1\n",
    "    if n > 12345:\n        raise ValueError('too big')\n\n\n",
    "numbers 12345, 3.14159 and 1000000; x=42*7",
    "  leading and  multiple   spaces and trailing  ",
    "a  1\tb\t\t2\n 3\n\n4",
    "unicode: café, naïve, Ελληνικά, 中文, ١٢٣ ²³ ½",
    "emoji 😀👍🏽 and ZWJ 👨\u200d👩\u200d👧",
    "tabs\there\r\nand CRLF\r\n",
    "contractions: don't, it's, we'll, I'VE",
    "punctuation!!! ...ok??? $5 <=> a|b ~x ^y `z`",
    "",
]
WITH_SPECIALS = [
    f"{IM_START}user\nWhat is 12345 + 1?{IM_END}\n{IM_START}assistant\n",
    f"text{ENDOFTEXT}more text {IM_END}",
    f"a {TOOL} b{TOOL}c",
]


def _corpus() -> list[str]:
    """Standard-library source, plus a run of numbers so that the vocabulary has merges of digits."""
    import json.decoder
    import textwrap

    numbers = " ".join(str(n) for n in range(1000, 1400)) + "\n" + " ".join(str(n) for n in range(10, 100))
    return [inspect.getsource(m) for m in (json.decoder, textwrap)] + [numbers]


def _write_gguf(path: Path, metadata: dict) -> Path:
    """A GGUF file holding ``metadata`` and one tiny tensor; ints are written as uint32."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _load(path: Path) -> Tokenizer:
    import gguf

    return tokenizer_from_gguf(gguf.GGUFReader(path), path)


def _split_specials(text: str, specials: list[str]) -> list[str]:
    """text, special, text, special, ... (as re.split with one group)."""
    import regex

    pattern = "(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return regex.split(pattern, text)


# ------------------------------------------------------------- byte-level BPE

# llama.cpp's regexes for each tokenizer.ggml.pre value (src/llama-vocab.cpp), applied in
# turn to the pieces of the previous one; text between matches stays a piece of its own.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_CPP_REGEXES = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt-2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "llama-bpe": [_LLAMA3],
    "qwen2": [_QWEN2],
}
# tiiuae/falcon-7b's tokenizer.json pre-tokenizer (llama.cpp's "falcon" regexes approximate it).
FALCON_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Punctuation", "behavior": "Contiguous"},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        {"type": "Digits", "individual_digits": False},
        {"type": "Split", "pattern": {"Regex": "[0-9][0-9][0-9]"}, "behavior": "Isolated", "invert": False},
    ],
}


def _llama_cpp_pieces(text: str, regexes: list[str]) -> list[str]:
    import regex

    pieces = [text]
    for pattern in regexes:
        compiled = regex.compile(pattern)
        out: list[str] = []
        for piece in pieces:
            start = 0
            for match in compiled.finditer(piece):
                if match.start() > start:
                    out.append(piece[start : match.start()])
                out.append(match.group())
                start = match.end()
            if start < len(piece):
                out.append(piece[start:])
        pieces = out
    return pieces


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE trained here: specials at ids 0..2, user-defined <tool> at the end."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_tokens([AddedToken(TOOL, special=False, normalized=False)])
    return tok


def _byte_bpe_metadata(tok, pre: str | None, **extra) -> dict:
    import json

    size = tok.get_vocab_size(with_added_tokens=True)
    tokens = [tok.id_to_token(i) for i in range(size)]
    specials = {ENDOFTEXT, IM_START, IM_END}
    types = [3 if t in specials else 4 if t == TOOL else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tok.token_to_id(IM_START),
        "tokenizer.ggml.eos_token_id": tok.token_to_id(IM_END),
        "tokenizer.ggml.unknown_token_id": tok.token_to_id(ENDOFTEXT),
        "tokenizer.ggml.padding_token_id": tok.token_to_id(IM_END),
    }
    if pre is not None:
        metadata["tokenizer.ggml.pre"] = pre
    metadata.update(extra)
    return metadata


@pytest.fixture(scope="module")
def byte_bpe_gguf(byte_bpe, tmp_path_factory):
    """pre value -> loaded GGUF tokenizer (files written once per module)."""
    folder = tmp_path_factory.mktemp("gguf_bpe")
    cache: dict[str, Tokenizer] = {}

    def get(pre: str) -> Tokenizer:
        if pre not in cache:
            cache[pre] = _load(_write_gguf(folder / f"{pre}.gguf", _byte_bpe_metadata(byte_bpe, pre)))
        return cache[pre]

    return get


def _reference_ids(tok, text: str, split) -> list[int]:
    """The trained BPE on the pieces ``split`` makes of each text chunk between added tokens."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import pre_tokenizers

    plain = RustTokenizer.from_str(tok.to_str())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    ids: list[int] = []
    for index, chunk in enumerate(_split_specials(text, [ENDOFTEXT, IM_START, IM_END, TOOL])):
        if index % 2:
            ids.append(tok.token_to_id(chunk))
        elif chunk:
            ids.extend(plain.encode(split(chunk), is_pretokenized=True, add_special_tokens=False).ids)
    return ids


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP_REGEXES))
def test_byte_bpe_ids_follow_llama_cpp_pre_tokenizer(byte_bpe, byte_bpe_gguf, pre):
    ours = byte_bpe_gguf(pre)
    regexes = LLAMA_CPP_REGEXES[pre]
    for text in SAMPLES + WITH_SPECIALS:
        expected = _reference_ids(byte_bpe, text, lambda chunk: _llama_cpp_pieces(chunk, regexes))
        assert ours.encode(text, add_special_tokens=False) == expected, (pre, text)
        assert ours.decode(expected, skip_special_tokens=False) == text


def _with_pre_tokenizer(tok, pre_tokenizer):
    from tokenizers import Tokenizer as RustTokenizer

    copy = RustTokenizer.from_str(tok.to_str())
    copy.pre_tokenizer = pre_tokenizer
    return copy


def test_smollm_matches_the_original_smollm2_pre_tokenizer(byte_bpe, byte_bpe_gguf):
    """SmolLM2's tokenizer.json: Sequence[Digits(individual_digits=True), ByteLevel]."""
    from tokenizers import pre_tokenizers

    original = _with_pre_tokenizer(
        byte_bpe,
        pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ),
    )
    ours = byte_bpe_gguf("smollm")
    for text in SAMPLES + WITH_SPECIALS:
        assert ours.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False).ids


def test_gpt2_matches_plain_byte_level(byte_bpe, byte_bpe_gguf):
    ours = byte_bpe_gguf("gpt-2")
    for text in SAMPLES + WITH_SPECIALS:
        assert ours.encode(text, add_special_tokens=False) == byte_bpe.encode(text, add_special_tokens=False).ids


def test_falcon_matches_the_original_falcon_pre_tokenizer(byte_bpe, byte_bpe_gguf):
    import json

    from tokenizers import Tokenizer as RustTokenizer

    data = json.loads(byte_bpe.to_str())
    data["pre_tokenizer"] = FALCON_PRE_TOKENIZER
    original = RustTokenizer.from_str(json.dumps(data))
    ours = byte_bpe_gguf("falcon")
    for text in SAMPLES + WITH_SPECIALS + ["a 12 b  999 1234567 ²³"]:
        assert ours.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False).ids


def test_smollm_splits_every_digit(byte_bpe, byte_bpe_gguf):
    gpt2, smollm = byte_bpe_gguf("gpt-2"), byte_bpe_gguf("smollm")
    text = "x = 12345 + 1100"

    def digit_pieces(tok: Tokenizer) -> list[str]:
        pieces = [byte_bpe.id_to_token(i) for i in tok.encode(text)]
        return [p for p in pieces if any(c.isdigit() for c in p)]

    # The vocabulary has digit merges, so plain GPT-2 splitting joins digits ...
    assert any(len(p.lstrip("Ġ")) > 1 for p in digit_pieces(gpt2))
    # ... while "smollm" gives every digit a token of its own.
    assert digit_pieces(smollm) == list("12345") + list("1100")
    assert smollm.decode(smollm.encode(text)) == text


def test_byte_bpe_special_and_user_defined_tokens(byte_bpe, byte_bpe_gguf):
    tok = byte_bpe_gguf("smollm")
    start, end, eot, tool = (byte_bpe.token_to_id(t) for t in (IM_START, IM_END, ENDOFTEXT, TOOL))
    ids = tok.encode(f"{IM_START}user\nhi{IM_END} {TOOL}")
    assert ids[0] == start and end in ids and ids[-1] == tool
    assert tok.is_special(start) and tok.is_special(end) and tok.is_special(eot)
    assert not tok.is_special(tool)
    assert tok.token_to_id(TOOL) == tool and tok.token_to_id(IM_END) == end
    # Specials are dropped by default, user-defined tokens kept.
    assert tok.decode(ids) == "user\nhi " + TOOL
    assert tok.decode(ids, skip_special_tokens=False) == f"{IM_START}user\nhi{IM_END} {TOOL}"


def test_byte_bpe_named_ids_and_flags(byte_bpe, tmp_path):
    start, end, eot = (byte_bpe.token_to_id(t) for t in (IM_START, IM_END, ENDOFTEXT))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    plain = _load(_write_gguf(tmp_path / "plain.gguf", _byte_bpe_metadata(byte_bpe, "smollm")))
    assert (plain.bos_token_id, plain.eos_token_ids, plain.pad_token_id, plain.unk_token_id) == (start, [end], end, eot)
    assert plain.vocab_size == len(plain) == byte_bpe.get_vocab_size(with_added_tokens=True)
    assert not plain.add_bos and not plain.add_eos and plain.chat_template is None  # gpt2 style: no BOS by default
    assert plain.encode("hi") == plain.encode("hi", add_special_tokens=False)

    flagged = _load(
        _write_gguf(
            tmp_path / "flagged.gguf",
            _byte_bpe_metadata(
                byte_bpe,
                "smollm",
                **{
                    "tokenizer.ggml.add_bos_token": True,
                    "tokenizer.ggml.add_eos_token": True,
                    "tokenizer.ggml.eot_token_id": eot,
                    "tokenizer.ggml.eom_token_id": start,
                    "tokenizer.chat_template": template,
                },
            ),
        )
    )
    body = flagged.encode("hi", add_special_tokens=False)
    assert flagged.encode("hi") == [start, *body, end]
    assert flagged.eos_token_ids == [end, eot, start] and flagged.eos_token_id == end
    assert flagged.chat_template == template
    assert flagged.decode(flagged.encode("hi")) == "hi"


def test_byte_bpe_special_tokens_record(byte_bpe, tmp_path):
    start, end, eot, tool = (byte_bpe.token_to_id(t) for t in (IM_START, IM_END, ENDOFTEXT, TOOL))
    metadata = _byte_bpe_metadata(byte_bpe, "smollm", **{"tokenizer.ggml.eot_token_id": eot})
    tok = _load(_write_gguf(tmp_path / "record.gguf", metadata))
    # The same record the folder loader builds: control tokens and named ids are special,
    # eos then eot stop, and nothing is left to a post-processor.
    assert tok.specials == SpecialTokens(
        bos_id=start,
        eos_id=end,
        stop_ids=(end, eot),
        pad_id=end,
        unk_id=eot,
        add_bos=False,
        add_eos=False,
        post_processor=False,
        special_ids=frozenset({start, end, eot}),
        chat_template=None,
    )
    assert tool not in tok.specials.special_ids


def test_llama3_pre_adds_bos_by_default_as_llama_cpp(byte_bpe, tmp_path):
    tok = _load(_write_gguf(tmp_path / "l3.gguf", _byte_bpe_metadata(byte_bpe, "llama-bpe")))
    assert tok.add_bos and tok.encode("hi")[0] == tok.bos_token_id
    off = _load(
        _write_gguf(
            tmp_path / "l3off.gguf",
            _byte_bpe_metadata(byte_bpe, "llama-bpe", **{"tokenizer.ggml.add_bos_token": False}),
        )
    )
    assert not off.add_bos


def test_missing_pre_means_llama_cpp_default(byte_bpe, byte_bpe_gguf, tmp_path):
    tok = _load(_write_gguf(tmp_path / "nopre.gguf", _byte_bpe_metadata(byte_bpe, None)))
    default = byte_bpe_gguf("default")
    for text in SAMPLES:
        assert tok.encode(text) == default.encode(text)


def test_supported_pre_tokenizer_table_builds():
    for name, style in SUPPORTED_PRE_TOKENIZERS.items():
        _normalizer, pre_tokenizer = style.build()
        assert pre_tokenizer is not None, name


# ------------------------------------------------------------ sentencepiece BPE


def _train_sentencepiece(add_dummy_prefix: bool) -> bytes:
    import sentencepiece

    model = io.BytesIO()
    # Llama 2's trainer options; one control and one user-defined symbol besides <unk>/<s>/</s>.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter("\n".join(_corpus()).splitlines()),
        model_writer=model,
        vocab_size=400,
        control_symbols=[IM_END],
        user_defined_symbols=[TOOL],
        add_dummy_prefix=add_dummy_prefix,
        **LLAMA2_SENTENCEPIECE_OPTIONS,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def sp_model():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=_train_sentencepiece(True))


def _sp_metadata(sp, **extra) -> dict:
    n = sp.get_piece_size()

    def kind(i: int) -> int:
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        if sp.is_unused(i):
            return 5
        return 4 if sp.id_to_piece(i) == TOOL else 1

    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    metadata.update(extra)
    return metadata


@pytest.fixture(scope="module")
def sp_gguf(sp_model, tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("gguf_sp")
    return _load(_write_gguf(folder / "sp.gguf", _sp_metadata(sp_model)))


def _sp_reference(sp, text: str, specials: dict[str, int]) -> list[int]:
    """sentencepiece per chunk between special/user-defined strings (llama.cpp's way)."""
    ids: list[int] = []
    for index, chunk in enumerate(_split_specials(text, list(specials))):
        if index % 2:
            ids.append(specials[chunk])
        elif chunk:
            ids.extend(sp.encode(chunk))
    return ids


def test_sentencepiece_ids_equal_sentencepiece(sp_model, sp_gguf):
    assert sp_gguf.add_bos and sp_gguf.bos_token_id == sp_model.bos_id() == 1
    assert sp_gguf.eos_token_ids == [sp_model.eos_id()] and sp_gguf.unk_token_id == sp_model.unk_id()
    assert sp_gguf.vocab_size == sp_model.get_piece_size()
    for text in SAMPLES:
        assert sp_gguf.encode(text) == [sp_model.bos_id(), *sp_model.encode(text)], text
        assert sp_gguf.encode(text, add_special_tokens=False) == sp_model.encode(text)
        assert sp_gguf.decode(sp_gguf.encode(text)) == text


def test_sentencepiece_specials_in_text(sp_model, sp_gguf):
    specials = {s: sp_model.piece_to_id(s) for s in ("<s>", "</s>", "<unk>", IM_END, TOOL)}
    texts = ["<s>[INST] hi 123 [/INST] ok</s>", f"x{IM_END}\ny {TOOL} z{TOOL}w", "<unk> a"]
    for text in texts:
        ids = sp_gguf.encode(text, add_special_tokens=False)
        assert ids == _sp_reference(sp_model, text, specials), text
        assert sp_gguf.decode(ids, skip_special_tokens=False) == text
    im_end, tool = specials[IM_END], specials[TOOL]
    assert sp_gguf.is_special(im_end) and not sp_gguf.is_special(tool)
    assert sp_gguf.decode(sp_gguf.encode(f"a{IM_END}b {TOOL}")) == f"ab {TOOL}"


def test_sentencepiece_without_space_prefix(tmp_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=_train_sentencepiece(False))
    tok = _load(_write_gguf(tmp_path / "noprefix.gguf", _sp_metadata(sp, **{"tokenizer.ggml.add_space_prefix": False})))
    for text in SAMPLES:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_flags(sp_model, tmp_path):
    tok = _load(
        _write_gguf(
            tmp_path / "flags.gguf",
            _sp_metadata(
                sp_model,
                **{
                    "tokenizer.ggml.add_bos_token": False,
                    "tokenizer.ggml.add_eos_token": True,
                    "tokenizer.ggml.padding_token_id": 2,
                    "tokenizer.ggml.eot_token_id": 3,
                    "tokenizer.chat_template": "{{ messages }}",
                },
            ),
        )
    )
    assert tok.encode("hi") == [*sp_model.encode("hi"), 2]
    assert tok.eos_token_ids == [2, 3] and tok.pad_token_id == 2
    assert tok.chat_template == "{{ messages }}"


def test_sentencepiece_repeated_piece_keeps_its_id(sp_model, tmp_path):
    metadata = _sp_metadata(sp_model)
    tokens = list(metadata["tokenizer.ggml.tokens"])
    repeated = next(t for t in reversed(tokens) if t.startswith("▁") and len(t) > 2)
    tokens.append(repeated)  # llama.cpp accepts a repeated string; sentencepiece would not
    metadata["tokenizer.ggml.tokens"] = tokens
    metadata["tokenizer.ggml.scores"] = [*metadata["tokenizer.ggml.scores"], 0.0]
    metadata["tokenizer.ggml.token_type"] = [*metadata["tokenizer.ggml.token_type"], 1]
    tok = _load(_write_gguf(tmp_path / "dup.gguf", metadata))
    assert tok.vocab_size == len(tokens)
    assert tok.decode([len(tokens) - 1]) == repeated.replace("▁", " ")
    text = "Hello world" + repeated.replace("▁", " ")
    assert tok.encode(text) == [1, *sp_model.encode(text)]


# ----------------------------------------------------------------- bad input


def _expect_error(tmp_path: Path, metadata: dict, *fragments: str) -> None:
    path = _write_gguf(tmp_path / "bad.gguf", metadata)
    with pytest.raises(CheckpointError) as info:
        _load(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_no_tokenizer_in_metadata(tmp_path):
    _expect_error(tmp_path, {"general.name": "weights only"}, "carries no tokenizer", "tokenizer.ggml.model")


def test_no_tokens_in_metadata(tmp_path):
    _expect_error(tmp_path, {"tokenizer.ggml.model": "gpt2"}, "carries no tokenizer", "tokenizer.ggml.tokens")


def test_unsupported_tokenizer_model(tmp_path):
    _expect_error(tmp_path, {"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a", "b"]}, "'t5'", "gpt2, llama")


def test_unsupported_pre_tokenizer(byte_bpe, tmp_path):
    _expect_error(tmp_path, _byte_bpe_metadata(byte_bpe, "klingon"), "'klingon'", "smollm", "llama-bpe", "gpt-2")


def test_gpt2_without_merges(byte_bpe, tmp_path):
    metadata = _byte_bpe_metadata(byte_bpe, "smollm")
    del metadata["tokenizer.ggml.merges"]
    _expect_error(tmp_path, metadata, "tokenizer.ggml.merges", "missing")


def test_gpt2_merges_of_unknown_tokens(byte_bpe, tmp_path):
    metadata = _byte_bpe_metadata(byte_bpe, "smollm")
    metadata["tokenizer.ggml.merges"] = ["zzzq qqqz"]
    _expect_error(tmp_path, metadata, "tokenizer.ggml.merges does not fit")


def test_gpt2_malformed_merge(byte_bpe, tmp_path):
    metadata = _byte_bpe_metadata(byte_bpe, "smollm")
    metadata["tokenizer.ggml.merges"] = ["nospace"]
    _expect_error(tmp_path, metadata, "merges[0]", "'nospace'")


@pytest.mark.parametrize("key", ["bos_token_id", "eos_token_id", "padding_token_id", "eot_token_id"])
def test_token_id_out_of_range(byte_bpe, tmp_path, key):
    metadata = _byte_bpe_metadata(byte_bpe, "smollm", **{f"tokenizer.ggml.{key}": 100_000})
    _expect_error(tmp_path, metadata, f"tokenizer.ggml.{key} is 100000", "outside the vocabulary")


def test_token_types_of_wrong_length(byte_bpe, tmp_path):
    metadata = _byte_bpe_metadata(byte_bpe, "smollm")
    metadata["tokenizer.ggml.token_type"] = [1, 1, 1]
    _expect_error(tmp_path, metadata, "token_type has 3 entries")


def test_wrong_value_type(byte_bpe, tmp_path):
    metadata = _byte_bpe_metadata(byte_bpe, "smollm", **{"tokenizer.ggml.bos_token_id": "<s>"})
    _expect_error(tmp_path, metadata, "tokenizer.ggml.bos_token_id must be an integer")


def test_add_bos_without_bos_id(byte_bpe, tmp_path):
    metadata = _byte_bpe_metadata(byte_bpe, "smollm", **{"tokenizer.ggml.add_bos_token": True})
    del metadata["tokenizer.ggml.bos_token_id"]
    _expect_error(tmp_path, metadata, "add_bos_token is true", "bos_token_id is not set")


def test_sentencepiece_without_unknown_token(sp_model, tmp_path):
    metadata = _sp_metadata(sp_model)
    del metadata["tokenizer.ggml.unknown_token_id"]
    metadata["tokenizer.ggml.token_type"] = [3 if t == 2 else t for t in metadata["tokenizer.ggml.token_type"]]
    _expect_error(tmp_path, metadata, "no unknown token")


def test_sentencepiece_scores_of_wrong_length(sp_model, tmp_path):
    metadata = _sp_metadata(sp_model)
    metadata["tokenizer.ggml.scores"] = [0.0, 1.0]
    _expect_error(tmp_path, metadata, "scores has 2 entries")


# ----------------------------------------------------------- the real model


# smollm2_gguf: the session fixture in conftest.py (fetched through pip once, cached)


def _rules_agree(text: str) -> bool:
    """Whether plain GPT-2 splitting and SmolLM2's digits-first splitting surely give the same ids.

    SmolLM2's vocabulary has no token that joins a number character (Unicode category N) to
    anything else, so the two differ only where GPT-2's `` ?\\p{N}+`` keeps a space with the
    number: after a run of two or more whitespace characters ("a  1": ["a", "ĠĠ", "1"] when
    digits are split first, ["a", "Ġ", "Ġ", "1"] otherwise), and before a non-ASCII number,
    whose first UTF-8 byte can merge with the space ("x ١": "Ġ", "Ù", "¡" vs "ĠÙ", "¡").
    """
    for i, char in enumerate(text):
        if not unicodedata.category(char).startswith("N"):
            continue
        if not char.isascii():
            return False
        if i >= 2 and text[i - 1].isspace() and text[i - 2].isspace():
            return False
    return True


def test_smollm2_matches_transformers_gguf_tokenizer(smollm2_gguf):
    import json.decoder
    import textwrap

    import transformers

    ours = _load(smollm2_gguf)
    theirs = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.pad_token_id) == (1, [2], 2)
    assert not ours.add_bos and ours.chat_template.startswith("{% for message in messages %}")

    texts = SAMPLES + [
        f"{IM_START}system\nYou are helpful.{IM_END}\n{IM_START}user\nWhat is 12345 + 678?{IM_END}\n",
        "x = 2024\nversion 1.2.3, 0x1F, 3e-5",
    ]
    texts += [t for m in (json.decoder, textwrap) for t in inspect.getsource(m).split("\n\n")]
    agreeing = [t for t in texts if _rules_agree(t)]
    assert len(agreeing) > 50
    for text in agreeing:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text

    # Where the rules differ, we split digits first, as SmolLM2's tokenizer.json and llama.cpp do;
    # transformers' GGUF converter builds a plain ByteLevel pre-tokenizer and does not.
    vocab = {i: t for t, i in theirs.get_vocab().items()}
    assert [vocab[i] for i in ours.encode("a  1")] == ["a", "ĠĠ", "1"]
    assert [vocab[i] for i in theirs.encode("a  1", add_special_tokens=False)] == ["a", "Ġ", "Ġ", "1"]
    assert [vocab[i] for i in ours.encode("    return 12345")] == ["ĠĠĠ", "Ġreturn", "Ġ", "1", "2", "3", "4", "5"]
    assert [vocab[i] for i in ours.encode("x =  10")][-3:] == ["ĠĠ", "1", "0"]
    assert [vocab[i] for i in ours.encode("x ١٢")] == ["x", "Ġ", "Ù", "¡", "Ù", "¢"]
    assert [vocab[i] for i in theirs.encode("x ١٢", add_special_tokens=False)][:2] == ["x", "ĠÙ"]
