"""Train a small MLP; `diff examples/single_process.py examples/ddp.py` shows all that data parallelism adds.
Run:  torchrun --standalone --nproc_per_node=2 examples/ddp.py [--epochs 5] [--dtype float64] [--out FILE]
"""

import argparse
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

SEED, SAMPLES, FEATURES, CLASSES, HIDDEN = 0, 1024, 10, 2, 32
GLOBAL_BATCH = 64  # samples per optimiser step, however many processes share them


class MLP(nn.Module):
    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.linear1 = nn.Linear(input_size, hidden_size)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        return self.linear2(self.relu(self.linear1(x)))


def make_data(dtype):
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(SAMPLES, FEATURES, generator=g, dtype=dtype)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long()  # a fixed rule the MLP can learn
    return TensorDataset(x, y)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--out", default=f"runs/examples/{Path(__file__).stem}.pt", help="the final state_dict")
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))  # set by torchrun
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")  # one device per rank

    torch.manual_seed(SEED)  # the same initial weights in every run
    model = MLP(FEATURES, HIDDEN, CLASSES).to(device, dtype)
    model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)  # all-reduces grads in backward
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = make_data(dtype)
    sampler = DistributedSampler(data, seed=SEED)  # this rank's share: positions rank, rank+world, ...
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # reshuffle with seed SEED + epoch, the same permutation on every rank
        total = 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            # mean, not sum: the ranks' gradients are averaged, and the mean of
            # N equal-sized local means is the mean over the whole global batch
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        total = torch.tensor(total, dtype=torch.float64, device=device)
        dist.all_reduce(total)  # sum of every rank's local means; / world below gives the global mean
        if rank == 0:
            print(f"epoch {epoch}: mean loss {total.item() / world / len(loader):.6f}")

    if rank == 0:
        torch.save(model.module.state_dict(), args.out)
        print(f"saved {args.out}")


if __name__ == "__main__":
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # env://: RANK, WORLD_SIZE, MASTER_*
    try:
        main()
    finally:
        gc.collect()  # free main's model (in ref cycles) before teardown, else gloo can abort at exit
        dist.destroy_process_group()
