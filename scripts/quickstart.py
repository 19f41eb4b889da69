"""The real-weights path end to end without downloading anything, on a tiny random Gemma 2:
HF transformers model -> save_pretrained (sharded safetensors) -> `gemma-jax convert` -> load ->
logits compared with HF -> greedy generation compared with HF (the sliding window's ring buffer
wraps three times). Needs the test extra (torch, transformers).

    python scripts/quickstart.py [--keep DIR]

Its files go to a temporary directory, removed at the end (--keep DIR keeps them in DIR).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_oracle import hf_generate, hf_logits, hf_model, save  # noqa: E402

import gemma_jax  # noqa: E402
from gemma_jax import cli  # noqa: E402


def run(work: Path) -> bool:
    """The four steps in `work`; True when both checks pass."""
    hf = hf_model(seed=0, embed_std=0.1, vocab_size=256, num_hidden_layers=4, sliding_window=8)
    save(hf, work / "hf", max_shard_size="40KB")
    print(f"[1/4] tiny random HF Gemma 2 saved to {work / 'hf'} "
          f"({len(list((work / 'hf').glob('*.safetensors')))} safetensors shards)")
    if cli.main(["--no-compile-cache", "convert", str(work / "hf"), str(work / "ckpt")]) != 0:
        return False
    print(f"[2/4] converted to {work / 'ckpt'}: {sorted(os.listdir(work / 'ckpt'))}")
    model = gemma_jax.load(work / "ckpt")
    ids = np.random.default_rng(0).integers(3, 256, (2, 40))
    diff = float(np.abs(model.logits(ids) - hf_logits(hf, ids)).max())
    print(f"[3/4] logits [2, 40, 256] vs HF eager float32: max |diff| = {diff:.2e}")
    prompt = ids[0, :7].tolist()
    ours = model.generate_ids([prompt], max_new_tokens=24, stop_ids=[])[0]
    theirs = hf_generate(hf, prompt, 24)
    print(f"[4/4] greedy 24 tokens (window 8, ring buffer wraps 3x): ours == HF: {ours == theirs}\n"
          f"      {ours}")
    return diff <= 2e-4 and ours == theirs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=lambda s: Path(s).expanduser(), metavar="DIR",
                    help="write the files here and keep them (default: a temporary directory)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        ok = run(args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="gemma_jax_quickstart_") as tmp:
            ok = run(Path(tmp))
    print(f"{'done' if ok else 'FAILED'} in {time.perf_counter() - start:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
