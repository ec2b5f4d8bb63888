"""Train a small MLP; `diff examples/single_process.py examples/ddp.py` shows all that data parallelism adds.
Run:  python examples/single_process.py [--epochs 5] [--dtype float64] [--out FILE]
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.sampler import RandomSampler

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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(SEED)  # the same initial weights in every run
    model = MLP(FEATURES, HIDDEN, CLASSES).to(device, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = make_data(dtype)
    g = torch.Generator()
    sampler = RandomSampler(data, generator=g)  # one permutation of the data per epoch
    loader = DataLoader(data, batch_size=GLOBAL_BATCH, sampler=sampler)

    for epoch in range(args.epochs):
        g.manual_seed(SEED + epoch)  # the same order DistributedSampler draws for this epoch
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
        print(f"epoch {epoch}: mean loss {total / len(loader):.6f}")

    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
