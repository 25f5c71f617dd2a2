"""CUDA check: the same checkpoint on GPU and CPU gives the same logits, tokens and kept
positions (fp32), bf16 on GPU stays close, and GPU decode speed for full vs corm.

    python scripts/check_cuda.py          # needs a CUDA GPU; prints a short report
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

import cormlm
from cormlm.checkpoint.random_weights import write_random_llama


def run(model, ids, mask, policy):
    out = cormlm.generate(model, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[],
                          cache=cormlm.CacheConfig(policy, **({"window": 32, "recent": 32} if policy == "corm" else {})))
    kept = [[[p.tolist() for p in row] for row in out.cache.positions(layer)] for layer in range(model.config.num_layers)]
    return out.new_tokens, kept, out.cache.stats()


@torch.inference_mode()
def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_llama(Path(tmp), hidden=256, layers=4, heads=8, kv_heads=2, max_positions=8192,
                                    qk_scale=6.0)
        cpu = cormlm.load_model(folder, dtype=torch.float32, device="cpu")
        gpu = cormlm.load_model(folder, dtype=torch.float32, device="cuda")
        gpu_bf16 = cormlm.load_model(folder, dtype=torch.bfloat16, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8192, (3, 300), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :100] = 0
    mask[2, :250] = 0
    diff = (gpu(ids, attention_mask=mask).cpu() - cpu(ids, attention_mask=mask))[mask.bool()].abs().max().item()
    print(f"fp32 logits GPU vs CPU, padded batch: max abs diff {diff:.2e}")
    diff16 = (gpu_bf16(ids).float().cpu() - cpu(ids)).abs().max().item()
    print(f"bf16 GPU vs fp32 CPU logits: max abs diff {diff16:.3f}")
    for policy in ("full", "corm"):
        tokens_c, kept_c, stats_c = run(cpu, ids, mask, policy)
        tokens_g, kept_g, stats_g = run(gpu, ids.cuda(), mask.cuda(), policy)
        _, _, stats_b = run(gpu_bf16, ids.cuda(), mask.cuda(), policy)
        print(f"{policy}: tokens equal {tokens_c == tokens_g}, kept positions equal {kept_c == kept_g}, "
              f"retained {stats_g.retained_fraction:.1%} (bf16 {stats_b.retained_fraction:.1%}), "
              f"bytes held {stats_g.bytes_held} vs full {stats_g.bytes_full}")
    for context in (1024, 8192 - 300):
        prompt = torch.randint(0, 8192, (1, context), generator=gen).cuda()
        for policy in ("full", "corm"):
            cache = cormlm.make_cache(gpu_bf16, cormlm.CacheConfig(policy), batch_size=1)
            gpu_bf16(prompt, cache=cache)
            token = prompt[:, -1:]
            times = []
            for _ in range(40):
                torch.cuda.synchronize()
                start = time.perf_counter()
                token = gpu_bf16.forward_unchecked(token, None, cache)[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            step = sorted(times[10:])[len(times[10:]) // 2]
            print(f"bf16 decode, context {context}, {policy}: {1 / step:.0f} tok/s, "
                  f"retained {cache.stats().retained_fraction:.1%}")


if __name__ == "__main__":
    main()
