"""End-to-end on a tiny random Gemma 2 (until a trained default model ships):
HF transformers model -> save_pretrained (sharded safetensors) -> `gemma-jax convert` -> load ->
logits compared with HF -> greedy generation compared with HF. Needs the test extra (torch).
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_oracle import hf_generate, hf_logits, hf_model, save  # noqa: E402

import gemma_jax  # noqa: E402


def main() -> None:
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gemma_jax_quickstart_"))
    hf = hf_model(seed=0, embed_std=0.1, vocab_size=256, num_hidden_layers=4, sliding_window=8)
    save(hf, work / "hf", max_shard_size="40KB")
    print(f"[1/4] tiny random HF Gemma 2 saved to {work / 'hf'} "
          f"({len(list((work / 'hf').glob('*.safetensors')))} safetensors shards)")
    subprocess.run([sys.executable, "-m", "gemma_jax", "convert", str(work / "hf"), str(work / "ckpt")], check=True)
    print(f"[2/4] converted to {work / 'ckpt'}: {sorted(os.listdir(work / 'ckpt'))}")
    model = gemma_jax.load(work / "ckpt")
    ids = np.random.default_rng(0).integers(3, 256, (2, 40))
    diff = np.abs(model.logits(ids) - hf_logits(hf, ids)).max()
    print(f"[3/4] logits [2, 40, 256] vs HF eager float32: max |diff| = {diff:.2e}")
    prompt = ids[0, :7].tolist()
    ours = model.generate_ids([prompt], max_new_tokens=24, stop_ids=[])[0]
    theirs = hf_generate(hf, prompt, 24)
    print(f"[4/4] greedy 24 tokens (window 8, ring buffer wraps 3x): ours == HF: {ours == theirs}\n"
          f"      {ours}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    if diff > 2e-4 or ours != theirs:
        sys.exit(1)


if __name__ == "__main__":
    main()
