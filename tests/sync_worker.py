"""One rank of the SyncBatchNorm tests (launched by tests/test_sync_batch_norm.py).

    python sync_worker.py RANK WORLD INIT_FILE OUT_DIR MODE

MODE "cases": runs every case of CASES (two training steps, then eval) on this rank's share
of a global batch and saves outputs, gradients and running statistics. MODE "dead-peer": rank
1 leaves right after joining; rank 0 runs a forward and must fail with a clear error.
"""

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from normlab.nn.sync_batch_norm import SyncBatchNorm

# (name, global shape, per-rank batch sizes, channels_last, momentum, affine)
CASES = [
    ("nchw-uneven", (8, 3, 4, 5), (5, 3), False, 0.1, True),
    ("nchw-empty-rank", (6, 3, 4, 4), (6, 0), False, 0.1, True),
    ("nc-one-each", (2, 7), (1, 1), False, 0.1, True),
    ("channels-last", (7, 4, 3, 3), (3, 4), True, 0.3, True),
    ("ncl-momentum-none", (9, 5, 6), (2, 7), False, None, True),
    ("ncdhw-no-affine", (4, 2, 3, 2, 3), (1, 3), False, 0.1, False),
]


def global_data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5
    grads = torch.randn((2,) + tuple(shape), generator=g, dtype=torch.float64)
    return x, grads


def main():
    rank, world, init_file, out_dir, mode = sys.argv[1:6]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=10))
    if mode == "dead-peer":
        if rank == 1:
            sys.exit(0)          # leaves without taking part in the collective
        m = SyncBatchNorm(3).train()
        try:
            m(torch.randn(4, 3, 5))
        except RuntimeError as e:
            print("ERROR:", e)
            sys.exit(3)
        sys.exit(0)
    results = {}
    for i, (name, shape, sizes, cl, momentum, affine) in enumerate(CASES):
        x, grads = global_data(shape, i)
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        m = SyncBatchNorm(shape[1], momentum=momentum, affine=affine, dtype=torch.float64)
        if affine:
            with torch.no_grad():
                m.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
                m.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
        out = {}
        for step in range(2):
            xr = x[sl].clone()
            if cl:
                xr = xr.contiguous(memory_format=torch.channels_last)
            xr.requires_grad_(True)
            y = m(xr)
            (y * grads[step][sl]).sum().backward()
            out[f"y{step}"] = y.detach().contiguous()
            out[f"dx{step}"] = xr.grad.contiguous()
            out[f"cl{step}"] = bool(cl and y.is_contiguous(memory_format=torch.channels_last))
            if affine:
                out[f"dw{step}"] = m.weight.grad.clone()
                out[f"db{step}"] = m.bias.grad.clone()
                m.weight.grad = m.bias.grad = None
        out["running_mean"] = m.running_mean.clone()
        out["running_var"] = m.running_var.clone()
        out["num_batches_tracked"] = int(m.num_batches_tracked)
        m.eval()
        out["y_eval"] = m(x[sl]).detach()
        results[name] = out
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
