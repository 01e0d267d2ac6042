"""benchmarks/clone_cost.py's report: each row names its machine and its speed probe; ratios
never cross machines, nor speeds of one machine."""

from pnc.bench.clone_cost import render, short_cpu
from pnc.bench.machine import speed_probe


def _row(label: str, cpu: str, seconds: float, old_fraction: float = 0.3) -> dict:
    return {
        "label": label,
        "commit": "abc1234",
        "cpu": cpu,
        "arch": "lenet5",
        "scale": "S",
        "old_fraction": old_fraction,
        "seconds": seconds,
        "peak_mb": 100.0,
        "accuracy": {"ori": 0.9, "tar": 1.0, "avg": 0.92},
        "target_cut": "block1_2",
        "phases": {"search": seconds / 2},
    }


def test_short_cpu_names():
    assert short_cpu("Intel(R) Xeon(R) Processor @ 2.50GHz") == "Intel Xeon"
    assert short_cpu("AMD EPYC 7B13 64-Core Processor") == "AMD EPYC"
    assert short_cpu("") == "?"


def test_ratio_only_between_rows_of_one_machine():
    intel, amd = "Intel(R) Xeon(R) Processor @ 2.50GHz", "AMD EPYC 7B13"
    rows = [_row("after", intel, 10.0), _row("after", amd, 12.0, old_fraction=0.0), _row("Joint+Full", intel, 40.0)]
    md = render({"rows": rows, "machine": {"cpu": intel, "cores": 2, "torch": "2.14.1"}})
    main_table = [line for line in md.splitlines() if line.startswith("| lenet5 S") and "abc1234" in line]
    lines = {line.split(" | ")[0]: line for line in main_table}
    same = lines["| lenet5 S 0.3"]
    assert "| Intel Xeon | - | 10.0 | 40.0 | 0.25 |" in same
    other = lines["| lenet5 S 0"]
    assert "| AMD EPYC | - | 12.0 | - | - |" in other
    assert "last on Intel(R) Xeon(R)" in md


def test_floor_takes_out_the_other_candidates():
    intel = "Intel(R) Xeon(R) Processor @ 2.50GHz"
    row = _row("after", intel, 100.0) | {
        "candidates": [
            {"target_cut": "block2_2", "seconds": 15.0},
            {"target_cut": "block1_2", "seconds": 25.0},
            {"target_cut": "stem", "seconds": 30.0},
        ]
    }
    untimed = _row("after", intel, 50.0, old_fraction=0.0)  # candidates without seconds: no floor row
    md = render({"rows": [row, untimed, _row("Joint+Full", intel, 200.0)], "machine": {"cpu": intel}})
    floor = md.split("## R known in advance")[1].split("##")[0]
    assert "| lenet5 S 0.3 | 100.0 | block1_2: 25.0 | 45.0 | 55.0 | 200.0 | 0.28 |" in floor
    assert "| lenet5 S 0 |" not in floor


def test_no_ratio_between_rows_of_different_speed():
    intel = "Intel(R) Xeon(R) Processor @ 2.50GHz"
    fast, slow = _row("after", intel, 10.0) | {"probe_ms": 4.0}, _row("after", intel, 20.0, 0.0) | {"probe_ms": 7.0}
    joint = _row("Joint+Full", intel, 40.0) | {"probe_ms": 4.4}  # within 15% of the fast row's probe
    md = render({"rows": [fast, slow, joint], "machine": {"cpu": intel}})
    main_table = [line for line in md.splitlines() if line.startswith("| lenet5 S") and "abc1234" in line]
    lines = {line.split(" | ")[0]: line for line in main_table}
    assert "| 4.00 | 10.0 | 40.0 | 0.25 |" in lines["| lenet5 S 0.3"]
    assert "| 7.00 | 20.0 | - | - |" in lines["| lenet5 S 0"]


def test_speed_probe_times_a_training_step_and_leaves_the_global_rng_alone():
    import torch

    state = torch.random.get_rng_state()
    probe = speed_probe(0.05)
    assert 0.01 < probe < 5000
    assert torch.equal(torch.random.get_rng_state(), state)
