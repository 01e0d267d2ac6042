"""The machine a benchmark ran on, as its result files name it, and how fast it ran then."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. 'AMD EPYC 7B13'), else what ``platform``
    knows, else 'unknown'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def speed_probe(seconds: float = 2.0) -> float:
    """How fast this process computes now: the median milliseconds of one fixed training step
    (a LeNet-5-sized conv net on a seeded batch of 64 28x28 images, forward, backward and SGD,
    on the CPU with torch's current thread count) over about ``seconds``. A VM's speed can drift
    by far more than the effects a timing benchmark measures (a 2-core Intel Xeon VM took 4.1,
    5.3 and 7.4 ms per step of a similar loop within 40 minutes, nothing else running): two
    timings are comparable only when their probes agree."""
    import torch
    from torch import nn

    cpu = torch.device("cpu")
    gen = torch.Generator(cpu).manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=gen, device=cpu)
    y = torch.randint(10, (64,), generator=gen, device=cpu)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 10),
        ).to(cpu)  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        return time.perf_counter() - start

    for _ in range(5):  # warm-up: allocator, oneDNN primitives
        step()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        times.append(step())
    return 1e3 * statistics.median(times)
