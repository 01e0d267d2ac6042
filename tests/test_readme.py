"""The README's Python example runs as written (on the digits pair, in a scratch folder)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "README has one Python example"
    monkeypatch.setenv("PNC_ZOO_DIR", str(tmp_path / "zoo"))
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "torch.Size([" in printed and "'7']" in printed  # the clone's shape and classes
    for name in ("clone.pnc", "clone.onnx", "target.onnx"):
        assert (tmp_path / name).stat().st_size > 0
