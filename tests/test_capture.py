"""`gemma-jax capture` (gemma_jax/capture.py): the shards equal run_with_cache on the same tokens; an
interrupted capture resumed equals an uninterrupted one, byte for byte; peak memory stays flat as the
corpus grows (measured in subprocesses reading their own VmHWM); the lazy reader; refusals.
The built-in default model (it has a tokenizer); rows longer than its 128-token sliding window."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma_jax
from gemma_jax import capture, default
from gemma_jax.errors import GenerationError

SEQ = 130
SITES = ("blocks.1.hook_resid_post", "blocks.3.attn.hook_z", "ln_final.hook_scale")
ROOT = Path(__file__).resolve().parents[1]


def _corpus(path: Path, lines: int, seed: int) -> Path:
    """Python-looking text (the default model was trained on Python), deterministic."""
    rng = np.random.default_rng(seed)
    words = ["self", "return", "value", "name", "def", "class", "None", "if", "for", "in", "import", "os",
             "path", "data", "result", "(", ")", ":", "=", "+", "[", "]", "'text'", "0", "1", "len"]
    out = []
    for i in range(lines):
        out.append("    " * int(rng.integers(0, 3)) + " ".join(rng.choice(words, int(rng.integers(3, 12)))))
        if i % 7 == 6:
            out.append("")
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.fixture(scope="module")
def model():
    return gemma_jax.load(default.checkpoint_dir(), dtype="float32")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return [_corpus(root / "a.py", 700, 0), _corpus(root / "b.py", 300, 1)]


SPEC = capture.CaptureSpec(SITES, seq_len=SEQ, batch_size=2, shard_bytes=1_200_000)


@pytest.fixture(scope="module")
def full(tmp_path_factory, model, texts):
    out = tmp_path_factory.mktemp("full") / "acts"
    return out, capture.capture(model, texts, out, SPEC)


def test_shards_equal_run_with_cache(model, texts, full, report):
    out, manifest = full
    data = capture.ActivationDataset(out)
    assert manifest["complete"] and data.complete and data.sites == list(SITES)
    rows = [r["rows"] for r in manifest["shards"]]
    assert len(rows) >= 3 and all(r == manifest["shard_rows"] for r in rows[:-1]) and 0 < rows[-1] <= rows[0]
    assert manifest["shard_rows"] % SPEC.batch_size == 0
    for shard in data.shards():   # bounded size: header + shard_rows rows
        assert shard.stat().st_size <= SPEC.shard_bytes + 4096
    # the rows: BOS, then the files' tokens (BOS between files), whole-file tokenization (< one chunk)
    tok = model.tokenizer
    stream = tok.encode(texts[0].read_text(), add_bos=False) + [tok.bos_id] + tok.encode(texts[1].read_text(),
                                                                                        add_bos=False)
    tokens = np.concatenate(list(data.iter_rows("tokens")))
    n = len(stream) // (SEQ - 1)
    assert len(data) == n == manifest["rows"] and tokens.shape == (n, SEQ)
    np.testing.assert_array_equal(tokens[:, 0], tok.bos_id)
    np.testing.assert_array_equal(tokens[:, 1:].ravel(), stream[:n * (SEQ - 1)])
    b = SPEC.batch_size   # the capture's batches (the last padded with its last row), so the same program
    got = {site: np.concatenate(list(data.iter_rows(site, rows=4))) for site in SITES}
    for start in range(0, n, b):
        rows = tokens[start:start + b]
        _, cache = model.run_with_cache(np.concatenate([rows, rows[-1:].repeat(b - len(rows), 0)]), names=list(SITES))
        for site in SITES:
            np.testing.assert_array_equal(got[site][start:start + b], np.asarray(cache[site])[:len(rows)], err_msg=site)
    # the reader's token batches: positions flattened, BOS dropped
    flat = np.concatenate(list(data.iter_batches("blocks.1.hook_resid_post", batch_tokens=1000)))
    whole = np.concatenate(list(data.iter_rows("blocks.1.hook_resid_post")))
    np.testing.assert_array_equal(flat, whole[:, 1:].reshape(-1, whole.shape[-1]))
    sizes = [len(b) for b in data.iter_batches("blocks.3.attn.hook_z", batch_tokens=1000, skip_bos=False)]
    assert sizes[:-1] == [1000] * (len(sizes) - 1) and sum(sizes) == n * SEQ


def test_interrupted_capture_resumes_to_the_same_files(tmp_path, model, texts, full):
    """Interrupted (KeyboardInterrupt, as Ctrl-C) in the middle of a shard, then a stray partial file
    as a killed process leaves it: the same call finishes the capture, and every file equals the
    uninterrupted capture's."""
    out = tmp_path / "acts"
    shard_rows = full[1]["shard_rows"]

    def interrupt(state):
        if state["rows"] >= 2 * shard_rows + SPEC.batch_size:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        capture.capture(model, texts, out, SPEC, on_batch=interrupt)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    assert not list(out.glob("*.partial"))                       # the unfinished shard was dropped
    (out / "shard_00002.safetensors.partial").write_bytes(b"half a shard")   # as after SIGKILL
    resumed = []
    capture.capture(model, texts, out, SPEC, on_batch=resumed.append)
    assert resumed[0]["rows"] == 2 * shard_rows + SPEC.batch_size   # it started after the written rows
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in full[0].iterdir())
    for name in files:
        assert (out / name).read_bytes() == (full[0] / name).read_bytes(), name
    # a finished capture is not redone; different settings on it are refused
    assert capture.capture(model, texts, out, SPEC, on_batch=resumed.append)["complete"] and len(resumed) > 1
    with pytest.raises(GenerationError, match="different 'sites'"):
        capture.capture(model, texts, out, capture.CaptureSpec(SITES[:1], seq_len=SEQ, batch_size=2))


def test_float16_and_max_rows(tmp_path, model, texts):
    """float16 shards hold the float32 activations rounded (the same program computes both)."""
    read = {}
    for dtype in ("float16", "float32"):
        spec = capture.CaptureSpec(SITES[:1], seq_len=SEQ, batch_size=4, dtype=dtype, max_rows=10)
        assert capture.capture(model, texts, tmp_path / dtype, spec)["rows"] == 10
        read[dtype] = np.concatenate(list(capture.ActivationDataset(tmp_path / dtype).iter_rows(SITES[0])))
    assert read["float16"].dtype == np.float16 and read["float16"].shape[0] == 10
    np.testing.assert_array_equal(read["float16"], read["float32"].astype(np.float16))


def test_capture_refusals(tmp_path, model, texts):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(GenerationError, match="not a capture directory"):
        capture.capture(model, texts, tmp_path / "busy", SPEC)
    with pytest.raises(GenerationError, match="no such text file"):
        capture.capture(model, [tmp_path / "missing.txt"], tmp_path / "o", SPEC)
    with pytest.raises(GenerationError, match="no hook site matches"):
        capture.capture(model, texts, tmp_path / "o", capture.CaptureSpec(("blocks.9.hook_resid_post",)))
    with pytest.raises(GenerationError, match="dtype must be float32 or float16"):
        capture.capture(model, texts, tmp_path / "o", capture.CaptureSpec(SITES, dtype="bfloat16"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(GenerationError, match="not UTF-8"):
        capture.capture(model, [tmp_path / "latin1.txt"], tmp_path / "o2", SPEC)


_PEAK = """
import sys
from gemma_jax import capture
from gemma_jax.cli import main

def hwm_kb():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])

marks = []
run = capture.capture
capture.capture = lambda *a, **k: run(*a, **k, on_batch=lambda state: marks.append((state['rows'], hwm_kb())))
rc = main(sys.argv[1:])
print('marks', ' '.join(f'{r}:{h}' for r, h in marks), 'rc', rc)
"""


def test_peak_memory_is_flat_as_the_corpus_grows(tmp_path, report):
    """A capture (through the CLI) over a corpus whose activations take ~200 MiB: the process's peak
    RSS once a quarter of the rows are written (compilation, buffers, first shard all done) is its
    peak at the end, within 20 MiB, while three quarters of the data are written in between.
    Measured in one process: the peak of two separate processes differs by up to ~120 MiB."""
    text = _corpus(tmp_path / "corpus.py", 2400 * 8, 7)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, "--no-compile-cache", "capture", "--text", str(text), "--sites",
         "blocks.0.attn.hook_pattern", "--out", str(out), "--seq-len", str(SEQ), "--batch-size", "8",
         "--store-dtype", "float16", "--shard-mb", "8"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("rc 0"), done.stderr[-2000:]
    marks = [tuple(int(v) for v in m.split(":")) for m in done.stdout.split("marks")[1].split("rc")[0].split()]
    rows = marks[-1][0]
    quarter = next(kb for r, kb in marks if r >= rows // 4) / 1024
    final = marks[-1][1] / 1024
    written = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2 ** 20
    report("capture peak RSS at 1/4 of the rows / at the end (MiB)", f"{quarter:.0f} / {final:.0f}")
    report("capture data written (MiB)", f"{written:.0f}")
    assert written > 150
    assert final - quarter < 20
