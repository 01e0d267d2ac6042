"""benchmarks/thin_conv_speed.py: times both memory formats per width and renders them."""

import torch

from pnc.bench.thin_conv_speed import render, step_ms


def test_step_ms_times_a_forward_and_backward_in_either_format():
    for fmt in (torch.contiguous_format, torch.channels_last):
        ms = step_ms(4, 6, fmt, steps=2)
        assert 0 < ms < 10_000


def test_render_lists_each_width_in_both_formats():
    result = {
        "machine": {"cpu": "cpu", "torch_threads": 1},
        "probe_ms": 5.0,
        "batch": 64,
        "steps": 3,
        "command": "cmd",
        "rows": [
            {
                "channels": 8,
                "size": 28,
                "nchw": {"ms": 8.0, "gmac_per_s": 10.0},
                "channels_last": {"ms": 6.0, "gmac_per_s": 13.3},
            }
        ],
    }
    assert "| 8 | 28 | 8.00 | 10.0 | 6.00 | 13.3 |" in render(result)
