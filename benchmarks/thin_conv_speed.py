"""Why a pruned branch trains slower per MAC than a full network: 3x3 convolutions of
ResNetC-20's widths, as pruned (50% of the channels kept) and as trained, on the CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/thin_conv_speed.py

Per (channels, size): one forward and backward of a 3x3 convolution (channels -> channels,
padding 1, no bias) on a seeded batch of 64 images, in PyTorch's default memory format
(NCHW) and in ``torch.channels_last``; the median milliseconds over ``--steps`` steps after
a warm-up, and the throughput in GMAC/s (forward + input and weight gradients: 3x the
forward MACs). Widths 8/16/32 are a 50%-pruned ResNetC-20's stages at 28/14/7 px, 16/32/64
its unpruned ones. Writes ``benchmarks/results/thin_conv_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pnc.bench.machine import speed_probe
from pnc.bench.paper import machine_info
from pnc.bench.results_files import write_json_md

OUT = Path(__file__).resolve().parent / "results"
SHAPES = [(8, 28), (16, 28), (16, 14), (32, 14), (32, 7), (64, 7)]
BATCH = 64


def step_ms(channels: int, size: int, memory_format: torch.memory_format, steps: int) -> float:
    """Median milliseconds of one forward + backward of the convolution."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=memory_format)
    x = torch.randn(BATCH, channels, size, size, generator=gen, device=gen.device)
    x = x.to(memory_format=memory_format).requires_grad_()
    times = []
    for i in range(steps + 3):  # 3 warm-up steps: oneDNN primitives, allocator
        start = time.perf_counter()
        conv(x).sum().backward()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run(steps: int) -> dict[str, Any]:
    rows = []
    for channels, size in SHAPES:
        macs = 3 * channels * channels * 9 * size * size * BATCH
        row: dict[str, Any] = {"channels": channels, "size": size}
        for name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            ms = step_ms(channels, size, fmt, steps)
            row[name] = {"ms": ms, "gmac_per_s": macs / ms / 1e6}
        rows.append(row)
    return {
        "machine": machine_info(),
        "probe_ms": speed_probe(),
        "batch": BATCH,
        "steps": steps,
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/thin_conv_speed.py " + shlex.join(sys.argv[1:]),
        "rows": rows,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        "# 3x3 convolutions at ResNetC-20's widths, pruned and unpruned: CPU speed",
        "",
        f"Forward + backward of one convolution (channels -> channels) on {result['batch']} images, median of "
        f"{result['steps']} steps; GMAC/s counts 3x the forward MACs. Speed probe {result['probe_ms']:.2f} ms "
        "(`pnc.bench.machine.speed_probe`).",
        "",
        "| channels | px | NCHW ms | NCHW GMAC/s | channels_last ms | channels_last GMAC/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        a, b = r["nchw"], r["channels_last"]
        lines.append(
            f"| {r['channels']} | {r['size']} | {a['ms']:.2f} | {a['gmac_per_s']:.1f} | {b['ms']:.2f} | "
            f"{b['gmac_per_s']:.1f} |"
        )
    m = result["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['torch_threads']} thread(s). Command: `{result['command']}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    result = run(parser.parse_args(argv).steps)
    write_json_md(OUT / "thin_conv_speed", result, render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
