"""benchmarks/clone_memory.py: every call of a wrapped function is a phase with its resident
memory at entry, peak and exit, nested phases one level deeper."""

import mmap
import time
from types import SimpleNamespace

from pnc.bench.clone_memory import PhaseMemory, render


def test_a_phase_sees_the_peak_of_what_it_held_and_its_nested_phases():
    def hold(mb: int) -> None:
        # an anonymous mapping of its own, every page written: closing it returns the pages
        # whatever the C allocator's state in this worker (a freed torch tensor may stay on
        # glibc's heap after earlier tests)
        block = mmap.mmap(-1, mb * 2**20)
        block.write(b"\x01" * len(block))
        time.sleep(0.2)  # the sampler (every 5 ms) sees it
        block.close()

    def outer() -> None:
        owner.inner(64)

    owner = SimpleNamespace(inner=hold, outer=outer)
    with PhaseMemory() as memory:
        memory.wrap(owner, "inner", lambda mb: f"hold {mb} MiB")
        memory.wrap(owner, "outer", lambda: "outer")
        owner.outer()
    first, second = memory.phases
    assert (first["phase"], first["depth"], second["phase"], second["depth"]) == ("outer", 0, "hold 64 MiB", 1)
    for phase in memory.phases:
        assert phase["peak"] - phase["entry"] >= 48  # 64 MiB held for 0.2 s
        assert phase["exit"] < phase["peak"]


def test_render_lists_each_phase_indented_by_depth():
    phases = [
        {"phase": "candidate 0, stage search", "depth": 0, "entry": 10.0, "peak": 50.0, "exit": 12.0},
        {"phase": "trainer at R=block1_2", "depth": 1, "entry": 10.0, "peak": 40.0, "exit": 30.0},
    ]
    result = {
        "target": "t",
        "source": "s",
        "scale": "S",
        "seed": 0,
        "keep_freed": False,
        "rss_before_mb": 800.0,
        "peak_mb": 50.0,
        "seconds": 12.0,
        "chosen_cut": "block1_2",
        "phases": phases,
        "machine": {"cpu": "cpu"},
    }
    text = render(result, "cmd")
    assert "Peak **50 MiB**" in text and "released at once" in text
    assert "| candidate 0, stage search | 10 | 50 | 12 |" in text
    assert "| &nbsp;&nbsp;trainer at R=block1_2 | 10 | 40 | 30 |" in text
