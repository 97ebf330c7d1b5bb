#!/usr/bin/env python3
"""PAPA-all with PyTorch members that train in processes of their own, through papa-service.

Each of `--members` processes trains a small CNN on Fashion-MNIST (its own seed, data order and
label smoothing); after every epoch it submits its weights to the population's round, takes back
the population's average, and re-estimates its BatchNorm statistics on a few batches of its
training data. After the last epoch the population finishes with the uniform soup of the
members' last weights. `--method independent` trains the same members without the service in
between and averages them once at the end (a merge job), for comparison. Prints each member's
test accuracy, their mean, and the soup's.

usage: PAPA_URL=... PAPA_API_KEY=... python3 examples/pytorch_papa.py \
           [--members 3] [--epochs 4] [--train 10000] [--method papa-all|independent]
needs Debian's python3-torch and python3-numpy, and dataset-fashion-mnist (or --data DIR).
"""

import argparse
import gzip
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python"))
from papa_client import Client, load_state_dict  # noqa: E402

LABEL_SMOOTHING = [0.0, 0.05, 0.1]
CALIBRATION_BATCHES = 8
BATCH = 128


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(data_dir, train_count):
    def split(prefix, count):
        x = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))[:count]
        y = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))[:count]
        return torch.tensor(x, dtype=torch.float32).unsqueeze(1) / 255.0, torch.tensor(y, dtype=torch.int64)

    return split("train", train_count), split("t10k", 10_000)


def model():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
    )


def recalibrate(net, x, generator):
    """BatchNorm statistics of averaged weights, re-estimated on random training batches."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
    net.train()
    with torch.no_grad():
        for _ in range(CALIBRATION_BATCHES):
            net(x[torch.randint(len(x), (BATCH,), generator=generator)])
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1


def accuracy(net, x, y):
    net.eval()
    with torch.no_grad():
        return sum((net(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum().item() for i in range(0, len(x), 1000)) / len(x)


def member(j, args, population_id, results):
    torch.set_num_threads(1)
    torch.manual_seed(1000 + j)
    generator = torch.Generator().manual_seed(j)
    (x, y), (tx, ty) = load(args.data, args.train)
    net = model()
    steps = args.epochs * ((len(x) + BATCH - 1) // BATCH)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=steps, pct_start=0.15)
    loss = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING[j % len(LABEL_SMOOTHING)])
    client = Client(args.url, args.key)
    population = client.population(population_id) if population_id else None
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), BATCH):
            batch = order[i : i + BATCH]
            optimizer.zero_grad()
            loss(net(x[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()
        if population is None:
            continue
        population.submit(j, net.state_dict())
        if epoch < args.epochs - 1:  # the last round's average is the final soup
            net.load_state_dict(population.next_state_dict(j, like=net.state_dict()))
            recalibrate(net, x, generator)
    checkpoint = None if population else client.upload(net.state_dict(), f"independent-member-{j}")["id"]
    results.put((j, accuracy(net, tx, ty), checkpoint))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--method", default="papa-all", choices=["papa-all", "independent"])
    parser.add_argument("--data", default=os.environ.get("PAPA_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--url", default=None)
    parser.add_argument("--key", default=None)
    args = parser.parse_args()
    started = time.monotonic()
    client = Client(args.url, args.key)
    population = None
    if args.method == "papa-all":
        population = client.create_population("pytorch-papa", args.members, "papa-all")
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=member, args=(j, args, population.id if population else None, results))
        for j in range(args.members)
    ]
    for p in processes:
        p.start()
    finished = sorted(results.get() for _ in processes)
    for p in processes:
        p.join()
        if p.exitcode != 0:
            sys.exit(f"a member process failed ({p.exitcode})")
    if population:
        soup_id = population.finish()["result"]["soup_checkpoint_id"]
    else:
        soup_id = client.merge("papa-all", [c for _, _, c in finished])["result"]["checkpoints"][0]["id"]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    (x, _), (tx, ty) = load(args.data, args.train)
    soup = model()
    soup.load_state_dict(load_state_dict(client.download(soup_id), like=soup.state_dict()))
    recalibrate(soup, x, torch.Generator().manual_seed(99))
    accuracies = [a for _, a, _ in finished]
    print(f"| {args.method} | {args.members} | {args.epochs} | {args.train} | "
          + " ".join(f"{100 * a:.2f}" for a in accuracies)
          + f" | {100 * sum(accuracies) / len(accuracies):.2f} | {100 * accuracy(soup, tx, ty):.2f} | {time.monotonic() - started:.0f} |")


if __name__ == "__main__":
    main()
