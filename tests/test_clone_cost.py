"""benchmarks/clone_cost.py's report: each row names its machine; ratios never cross machines."""

from pnc.bench.clone_cost import render, short_cpu


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
    assert "| Intel Xeon | 10.0 | 40.0 | 0.25 |" in same
    other = lines["| lenet5 S 0"]
    assert "| AMD EPYC | 12.0 | - | - |" in other
    assert "last on Intel(R) Xeon(R)" in md
