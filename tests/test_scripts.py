"""scripts/quickstart.py end to end (the real-weights path on a tiny random model, checked against
HF): it passes and leaves no files behind."""

import importlib.util
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_passes_and_cleans_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))      # its temporary directory goes here
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "scripts" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    assert quickstart.main([]) == 0
    out = capsys.readouterr().out
    assert "[4/4] greedy 24 tokens" in out and "ours == HF: True" in out and "done in" in out
    assert list(tmp_path.iterdir()) == []
