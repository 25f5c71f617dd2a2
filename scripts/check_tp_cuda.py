"""Tensor parallelism on CUDA with NCCL: every rank's results against one process on the GPU.

    torchrun --standalone --nproc-per-node N scripts/check_tp_cuda.py

Each rank loads two random Llamas (8 heads; 2 KV heads, and 1: MQA, whose KV head is
replicated over the ranks) with ``tp=N`` on ``cuda:LOCAL_RANK`` (NCCL), and compares with
the same model loaded whole on the same GPU: fp32 logits of a padded batch (TF32 off),
greedy tokens, and the positions CORM and H2O keep per layer, row and KV head. With one
process (N = 1) the model goes through the same sharded code over a one-rank NCCL mesh.
Rank 0 prints a short report. Needs one GPU per rank: NCCL refuses two ranks on one GPU
("Duplicate GPU detected"), so a one-GPU machine runs N = 1 only.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import cormlm
from cormlm.checkpoint.random_weights import write_random_llama
from cormlm.parallel import shutdown

POLICIES = ({"policy": "corm", "window": 16, "recent": 8}, {"policy": "h2o", "budget": 24, "recent": 8})


def kept(out, layers: int) -> list:
    return [[[p.tolist() for p in row] for row in out.cache.positions(layer)] for layer in range(layers)]


def whole_positions(mine: list, world: int, kv_heads: int) -> list:
    """Per layer, row and KV head of the whole model, from every rank's own KV heads."""
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if len(mine[0][0]) * world == kv_heads:  # split: rank order is KV-head order
        return [[sum((everyone[r][layer][row] for r in range(world)), []) for row in range(len(mine[layer]))]
                for layer in range(len(mine))]
    assert all(other == everyone[0] for other in everyone), "ranks sharing a KV head kept different keys"
    return everyone[0]


@torch.inference_mode()
def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if world == 1:  # a one-rank NCCL mesh: the sharded code path, nothing to split
        dist.init_process_group("nccl", device_id=device)
        tp = init_device_mesh("cuda", (1,))
    else:
        tp = world
    lines = [f"{world} rank(s); GPU {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
             f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8192, (2, 200), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :50] = 0
    with tempfile.TemporaryDirectory() as tmp:
        for kv_heads in (2, 1):
            folder = write_random_llama(Path(tmp) / f"kv{kv_heads}", hidden=256, layers=4, heads=8, kv_heads=kv_heads,
                                        qk_scale=6.0)
            whole = cormlm.load_model(folder, dtype=torch.float32, device=device)
            split = cormlm.load_model(folder, dtype=torch.float32, device=device, tp=tp)
            diff = (split(ids, attention_mask=mask) - whole(ids, attention_mask=mask))[mask.bool()].abs().max().item()
            report = [f"kv_heads={kv_heads} (backend {dist.get_backend()}): fp32 logits max abs diff {diff:.1e}"]
            for cfg in POLICIES:
                runs = [cormlm.generate(model, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[],
                                        cache=cormlm.CacheConfig(**cfg)) for model in (whole, split)]
                positions = whole_positions(kept(runs[1], 4), world, kv_heads)
                retained = runs[0].cache.stats().retained_fraction
                report.append(f"{cfg['policy']}: tokens equal {runs[0].new_tokens == runs[1].new_tokens}, kept positions "
                              f"equal {positions == kept(runs[0], 4)} ({retained:.0%} kept)")
            lines.append("; ".join(report))
    if rank == 0:
        print("\n".join(lines), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
