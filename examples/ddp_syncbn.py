"""Train a small CNN with DistributedDataParallel + normlab's SyncBatchNorm on CPU (gloo).

    torchrun --nproc_per_node 2 examples/ddp_syncbn.py [--epochs 5] [--batch-size 16]

Data: scikit-learn's bundled 8x8 digits (nothing is downloaded). Each rank trains on its shard
of every batch; SyncBatchNorm normalizes with the statistics of the whole global batch, so the
model is the one a single process would train with batch size (batch-size x world size).
"""

import argparse
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import normlab.nn as nln
from normlab.nn import SyncBatchNorm, convert_sync_batchnorm


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16, help="per rank")
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args()

    dist.init_process_group("gloo")                      # torchrun sets RANK, WORLD_SIZE, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0   # (N, 1, 8, 8)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    train_set = TensorDataset(x[train], y[train])
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)

    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nln.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nln.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, 10))
    model = convert_sync_batchnorm(model)
    n_sync = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
    model = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        total = 0.0
        for xb, yb in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss) * len(xb)
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {total / len(sampler):.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    if rank == 0:
        print(f"SyncBatchNorm layers: {n_sync}; world size {world}")
        print(f"test accuracy {acc:.3f} on {len(test)} held-out digits")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
