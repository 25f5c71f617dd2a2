"""Train the embedded default model on the Python standard library's own source.

    python scripts/train_tiny.py                       # full run -> weights/
    python scripts/train_tiny.py --steps 20 --out /tmp/smoke   # a smoke run

Data: every .py file of the running Python's standard library (test folders and
site-packages excluded; ``--stdlib`` points elsewhere), split by a hash of the relative
path: 5% of files are held out and never trained on. A byte-level BPE tokenizer is trained
with ``tokenizers`` on the training files. The model is Llama-3-shaped (RoPE, GQA, SwiGLU,
RMSNorm, tied embeddings) and is cormlm's own model class. Progress is printed as it goes,
a checkpoint is written every ``--checkpoint-every`` steps (``--out``/train_state.pt) and a
rerun resumes from it; seeds are fixed. The result is a Hugging Face checkpoint in
``--out`` (config.json, safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json), loadable by cormlm and by transformers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import torch

from cormlm.checkpoint.save import save_pretrained
from cormlm.config import ModelConfig, RopeConfig
from cormlm.models.transformer import CausalLM

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
HELD_OUT_PERCENT = 5


def stdlib_files(root: Path) -> list[Path]:
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS)
        files += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return files


def is_held_out(relative: str) -> bool:
    """Deterministic, version-independent split by the file's path."""
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def read_split(root: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    train, held = [], []
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (held if is_held_out(rel) else train).append((rel, text))
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": False,
         "model_max_length": 1_000_000, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    return tok


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """All documents as one stream: BOS doc EOS BOS doc EOS ..."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += [bos, *enc.ids, eos]
    return torch.tensor(ids, dtype=torch.long)


def model_config(args, vocab: int, bos: int, eos: int) -> ModelConfig:
    return ModelConfig(
        family="llama", vocab_size=vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads, intermediate_size=args.intermediate,
        max_position_embeddings=args.context, norm_eps=1e-5, rope=RopeConfig(theta=args.rope_theta),
        tie_word_embeddings=True, bos_token_id=bos, eos_token_ids=(eos,),
    )


def init_weights(model: CausalLM, std: float = 0.02) -> None:
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif p.dim() == 2:
            scale = std / math.sqrt(2 * model.config.num_layers) if name.endswith(("o_proj.weight", "down.weight")) else std
            torch.nn.init.normal_(p, std=scale)
        else:
            torch.nn.init.zeros_(p)


def batches(stream: torch.Tensor, batch: int, length: int, gen: torch.Generator):
    starts = torch.randint(0, len(stream) - length - 1, (batch,), generator=gen)
    rows = torch.stack([stream[s: s + length + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def held_out_loss(model: CausalLM, stream: torch.Tensor, length: int, device, autocast) -> float:
    """Mean next-token loss over consecutive windows covering the held-out stream."""
    losses, count = 0.0, 0
    for start in range(0, len(stream) - length - 1, length):
        window = stream[start: start + length + 1].to(device)
        with autocast:
            logits = model(window[None, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0].float(), window[1:], reduction="sum")
        losses, count = losses + float(loss), count + length
    return losses / max(count, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "weights")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--context", type=int, default=2048, help="max_position_embeddings")
    parser.add_argument("--rope-theta", type=float, default=500000.0)
    parser.add_argument("--seq", type=int, default=1024, help="training window")
    parser.add_argument("--long-seq-steps", type=int, default=200, help="final steps trained at --context length")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    started = time.time()

    if not args.stdlib.is_dir():
        raise SystemExit(f"train_tiny: error: --stdlib {args.stdlib} is not a folder")
    train_docs, held_docs = read_split(args.stdlib)
    if not train_docs or not held_docs:
        raise SystemExit(f"train_tiny: error: {args.stdlib} gave {len(train_docs)} training and {len(held_docs)} "
                         f"held-out .py files; point --stdlib at a Python standard library folder")
    print(f"data: {len(train_docs)} training files, {len(held_docs)} held-out files from {args.stdlib}", flush=True)
    tokenizer_file = args.out / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tokenizer_file))
        print("tokenizer: reusing", tokenizer_file, flush=True)
    else:
        tok = train_tokenizer([t for _, t in train_docs], args.vocab, args.out)
        print(f"tokenizer: trained, {tok.get_vocab_size()} tokens", flush=True)
    train_stream = token_stream(tok, [t for _, t in train_docs])
    held_stream = token_stream(tok, [t for _, t in held_docs])
    print(f"tokens: {len(train_stream):,} training, {len(held_stream):,} held out", flush=True)

    config = model_config(args, tok.get_vocab_size(), tok.token_to_id(BOS), tok.token_to_id(EOS))
    model = CausalLM(config).to(device)
    init_weights(model)
    model.reset_derived_buffers()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters, device {device}", flush=True)

    state_file = args.out / "train_state.pt"
    step, gen = 0, torch.Generator().manual_seed(1)
    if state_file.is_file():
        state = torch.load(state_file, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        gen.set_state(state["generator"])
        print(f"resumed from {state_file} at step {step}", flush=True)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    tokens_done, window_start = 0, time.time()
    while step < args.steps:
        long_phase = step >= args.steps - args.long_seq_steps
        length = args.context if long_phase else args.seq
        batch = max(1, args.batch * args.seq // length)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = batches(train_stream, batch, length, gen)
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast:
            logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_done += inputs.numel()
        if step % 10 == 0 or step == args.steps:
            rate = tokens_done / (time.time() - window_start)
            eta = (args.steps - step) * inputs.numel() / max(rate, 1e-9)
            print(f"step {step}/{args.steps} loss {loss.item():.3f} lr {lr:.2e} seq {length} "
                  f"{rate:,.0f} tok/s eta {eta / 60:.1f} min", flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "generator": gen.get_state()}, state_file)

    model.eval()
    loss = held_out_loss(model, held_stream, args.context, device, autocast)
    save_pretrained(model, args.out, dtype=torch.bfloat16)
    minutes = (time.time() - started) / 60
    summary = {"held_out_loss": round(loss, 4), "held_out_perplexity": round(math.exp(loss), 3), "steps": step,
               "parameters": params, "device": str(device), "minutes_this_run": round(minutes, 1),
               "train_tokens": len(train_stream), "held_out_tokens": len(held_stream)}
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done: held-out loss {loss:.4f} (perplexity {math.exp(loss):.2f}) after {step} steps, "
          f"{minutes:.1f} min this run; saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
