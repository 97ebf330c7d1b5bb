"""PyTorch side of `npm run bench:speed`: the same model, batch and optimizer as ours.

usage: python3 bench/torch_step.py MODEL THREADS STEPS WARMUP   (MODEL: mlp or cnn)
prints one line: step_ms=<median milliseconds of one training step>
"""
import statistics
import sys
import time

import torch
from torch import nn

model_name, threads, steps, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)

if model_name == "mlp":
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )
else:
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32, momentum=0.1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64, momentum=0.1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
    )
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
x = torch.rand(128, 1, 28, 28)
y = torch.softmax(torch.rand(128, 10), dim=1)  # soft labels, as ours (mixup, label smoothing)

times = []
for i in range(warmup + steps):
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = torch.sum(-y * torch.log_softmax(model(x), dim=1), dim=1).mean()
    loss.backward()
    optimizer.step()
    if i >= warmup:
        times.append((time.perf_counter() - start) * 1000)
print(f"step_ms={statistics.median(times):.3f}")
