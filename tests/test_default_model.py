"""The default model shipped in the package: real path (convert -> load -> generate), parity with
HF on it, and evidence that it has learned (loss far below chance on code it never saw)."""

import json

import numpy as np
import pytest

import gemma_jax
from gemma_jax import cli, default

HELD_OUT = '''
class Stack:
    """A last-in, first-out container."""

    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from empty stack")
        return self._items.pop()

    def __len__(self):
        return len(self._items)
'''


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The default model converted through the real path into a fresh cache directory."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    ckpt = default.checkpoint_dir()
    yield ckpt
    mp.undo()


def test_shipped_files_are_small_hf_format():
    files = {p.name: p.stat().st_size for p in default.HF_DIR.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20
    config = json.loads((default.HF_DIR / "config.json").read_text())
    assert config["model_type"] == "gemma2"
    assert "sliding_attention" in config["layer_types"] and "full_attention" in config["layer_types"]
    assert config["num_attention_heads"] > config["num_key_value_heads"]


def test_empty_xdg_cache_home_means_the_default(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert default.cache_root().is_absolute()


def test_converted_once_into_the_cache(converted):
    assert (converted / "gemma_config.json").is_file() and (converted / "tokenizer.model").is_file()
    assert default.checkpoint_dir() == converted  # second call: no new conversion


def test_parity_with_hf_on_the_default_model(converted, report):
    from gemma_jax.parity import hf_activations
    model = gemma_jax.load(converted, dtype="float32")
    ids = np.asarray([model.tokenizer.encode(HELD_OUT * 4)[:400]])
    assert ids.shape[1] > 3 * model.config.sliding_window  # the sliding layers' window matters
    _, theirs = hf_activations(default.HF_DIR, ids)
    diff = float(np.abs(model.logits(ids) - theirs).max())
    report("default model parity max|dlogit| vs HF", diff)
    assert diff <= 2e-4


def test_it_has_learned(converted, report):
    model = gemma_jax.load(converted, dtype="float32")
    ids = np.asarray([model.tokenizer.encode(HELD_OUT)])
    logits = model.logits(ids)[0, :-1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    loss = float(np.mean(logz - logits[np.arange(len(logits)), ids[0, 1:]]))
    report("default model loss on unseen code (nats/token; chance = ln V)", f"{loss:.2f} vs {np.log(model.config.vocab_size):.2f}")
    assert loss < 0.5 * np.log(model.config.vocab_size)
    text = model.generate("    def __init__(self", max_new_tokens=12)
    assert text.strip()


def test_cli_uses_the_default_model(converted, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(converted.parent.parent))
    assert cli.main(["--no-compile-cache", "generate", "--prompt", "import os\n", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "built-in default model" in captured.err
    assert captured.out.startswith("import os\n") and len(captured.out) > len("import os\n") + 1


def test_interp_demo_runs_on_the_default_model(converted, tmp_path):
    """The worked example of docs/interpretability.md, end to end on the default model."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XDG_CACHE_HOME": str(converted.parent.parent),
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(root / "scripts" / "interp_demo.py"), "--out", str(tmp_path),
                           "--sweep-sites", "blocks.0.hook_resid_pre"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "built-in default model" in proc.stdout
    assert (tmp_path / "attention_patterns.png").stat().st_size > 1000


def test_readme_python_block_runs_as_written(converted, capsys, monkeypatch):
    """README's Python example, executed as written on the default model: its streamed line is
    the returned text, printed as one continuous piece."""
    import re
    from pathlib import Path
    monkeypatch.setenv("XDG_CACHE_HOME", str(converted.parent.parent))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"From Python[^\n]*\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert "load_default()" in block
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    out = capsys.readouterr().out
    assert out == scope["text"] and len(out) > 20
    assert scope["logits"].shape[:2] == (1, len(scope["ids"])) and len(scope["batch"]) == 2
    assert isinstance(scope["reply"], str)
    assert scope["cache"]["blocks.0.hook_resid_post"].shape == (1, len(scope["ids"]), 256)


def test_chat_with_its_defaults_goes_on_as_the_context_fills(converted, capsys, monkeypatch):
    """`gemma-jax chat` on the default model (1024 positions, 256 tokens a reply by default): the
    second turn and later ones are answered; once the context nears its end, replies are shortened
    (said once), and a message with no room left is refused with /reset as the way on."""
    import io
    import sys
    monkeypatch.setenv("XDG_CACHE_HOME", str(converted.parent.parent))
    turns = ["import os", "class Config:", "def main():", "x = 1", "print(x)", "return"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n"))
    assert cli.main(["--no-compile-cache", "chat"]) == 0
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    warnings = [line for line in err.splitlines() if line.startswith("gemma-jax: warning: ")]
    assert out.count("model> ") + len(errors) == len(turns) and out.count("model> ") >= 4
    assert all("no room for a reply" in e and "/reset" in e for e in errors)
    assert len(warnings) <= 1 and (warnings or not errors)
    assert all("replies are now shortened to the room left" in w for w in warnings)
