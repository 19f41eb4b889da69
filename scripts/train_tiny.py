"""Train the default model that ships in the package: a tiny Gemma 2 (same architecture:
local/global alternation, soft-caps, GQA) with its own SentencePiece vocabulary, on the Python
standard library's own source code, which exists on any machine with Python.

    python scripts/train_tiny.py --minutes 45

Writes the model in Hugging Face format (config.json, model.safetensors, tokenizer.model) to
gemma_jax/default_model/, the loss curve to docs/default_model_loss.png and a log with the corpus
description, its size and licence to docs/default_model.json. Needs optax and matplotlib
(`pip install -e '.[train]'`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sentencepiece as spm
from flax import nnx
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gemma_jax import checkpoint  # noqa: E402
from gemma_jax.config import FULL, SLIDING, GemmaConfig  # noqa: E402
from gemma_jax.convert import name_table  # noqa: E402
from gemma_jax.model import Transformer  # noqa: E402

SPECIALS = ["<start_of_turn>", "<end_of_turn>", "\n"]


def corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
    return sorted(f for f in stdlib.rglob("*.py") if not skip & set(f.relative_to(stdlib).parts))


def is_held_out(path: Path) -> bool:
    return hashlib.sha256(path.name.encode()).digest()[0] < 13  # ~5% of files


def train_tokenizer(texts: list[str], vocab: int, out: Path) -> spm.SentencePieceProcessor:
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=str(out.with_suffix("")), model_type="bpe", vocab_size=vocab,
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=SPECIALS,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=8192,
        input_sentence_size=2_000_000, shuffle_input_sentence=True, num_threads=2, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(out))


def model_config(vocab: int) -> GemmaConfig:
    layers = 4
    return GemmaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                       sliding_window=128, max_position_embeddings=1024,
                       layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers)))


def token_stream(sp, texts: list[str]) -> np.ndarray:
    ids = []
    for text in texts:
        ids += [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    return np.asarray(ids, np.int32)


def export_hf(state, config: GemmaConfig, out: Path) -> None:
    """Our params -> HF Gemma2ForCausalLM tensors (inverse of the converter's name table)."""
    flat = checkpoint.flatten(nnx.to_pure_dict(state))
    tensors = {}
    for ours, (theirs, how) in name_table(config).items():
        w = np.asarray(flat[ours], np.float32)
        if how == "copy":
            parts = [w]
        elif how == "transpose":
            parts = [w.T]
        else:
            parts = [w[:, 0, :].T, w[:, 1, :].T]
        tensors.update({t: np.ascontiguousarray(p) for t, p in zip(theirs, parts)})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = config.to_hf()
    hf.update(torch_dtype="float32", cache_implementation="hybrid")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=45.0, help="training time budget")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "gemma_jax" / "default_model")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    started = time.time()

    files = corpus_files()
    texts = {f: f.read_text(encoding="utf-8", errors="replace") for f in files}
    train_texts = [t for f, t in texts.items() if not is_held_out(f)]
    held_texts = [t for f, t in texts.items() if is_held_out(f)]
    args.out.mkdir(parents=True, exist_ok=True)
    sp = train_tokenizer(train_texts, args.vocab, args.out / "tokenizer.model")
    train_ids, held_ids = token_stream(sp, train_texts), token_stream(sp, held_texts)
    print(f"corpus: {len(files)} files, {sum(map(len, texts.values())) / 1e6:.1f} M chars, "
          f"{len(train_ids) / 1e6:.2f} M train tokens, {len(held_ids) / 1e6:.3f} M held-out tokens", flush=True)

    config = model_config(args.vocab)
    model = Transformer(config, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    # 100 warmup steps, cosine decay to lr/10 at step 5000, then constant; the time budget ends training
    decay_end = 5_000
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, 100, decay_end, args.lr * 0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.01))
    opt_state = optimizer.init(params)
    positions = jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), (args.batch, args.seq))

    def loss_fn(params, batch):
        m = nnx.merge(graphdef, params)
        hidden, _ = m(batch[:, :-1], positions)
        logits = m.logits(hidden)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(loss_fn)

    def held_out_loss() -> float:
        n = args.seq + 1
        windows = [held_ids[i:i + n] for i in range(0, len(held_ids) - n, n)][:64]
        losses = [float(eval_loss(params, jnp.asarray(np.stack(windows[i:i + args.batch]))))
                  for i in range(0, len(windows) - args.batch + 1, args.batch)]
        return float(np.mean(losses))

    rng = np.random.default_rng(args.seed)
    log = {"step": [], "loss": [], "held_out": []}
    budget = args.minutes * 60
    t0, steps, recent = time.time(), 0, []
    while time.time() - t0 < budget:
        starts = rng.integers(0, len(train_ids) - args.seq - 1, args.batch)
        batch = jnp.asarray(np.stack([train_ids[s:s + args.seq + 1] for s in starts]))
        params, opt_state, loss = step(params, opt_state, batch)
        steps += 1
        recent.append(float(loss))
        if steps % 25 == 0:
            log["step"].append(steps)
            log["loss"].append(float(np.mean(recent)))
            recent = []
            if steps % 200 == 0:
                log["held_out"].append((steps, held_out_loss()))
            print(f"step {steps}  loss {log['loss'][-1]:.3f}  {(time.time() - t0) / steps:.2f} s/step", flush=True)
    final_held_out = held_out_loss()
    log["held_out"].append((steps, final_held_out))
    export_hf(params, config, args.out)

    corpus = {"what": "Python standard library source (*.py, without test/, tests/, idlelib/, site-packages/)",
              "python": platform.python_version(), "files": len(files),
              "chars": sum(map(len, texts.values())), "train_tokens": int(len(train_ids)),
              "held_out_tokens": int(len(held_ids)), "held_out_files": len(held_texts),
              "licence": "Python Software Foundation License Version 2 (see LICENSE.txt of the Python install)"}
    summary = {"corpus": corpus, "config": config.to_dict(), "parameters": int(n_params),
               "training": {**{k: getattr(args, k) for k in ("minutes", "vocab", "seq", "batch", "lr", "seed")},
                            "steps": steps, "tokens_seen": steps * args.batch * args.seq,
                            "wall_minutes": (time.time() - started) / 60},
               "final_train_loss": log["loss"][-1] if log["loss"] else None,
               "held_out_loss": final_held_out, "log": log}
    args.docs.mkdir(exist_ok=True)
    (args.docs / "default_model.json").write_text(json.dumps(summary, indent=1) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(log["step"], log["loss"], label="train (mean of 25 steps)")
    ax.plot(*zip(*log["held_out"]), "o-", label="held-out files")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Default model: tiny Gemma 2 on the stdlib")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.docs / "default_model_loss.png", dpi=110)
    print(f"done: {steps} steps, held-out loss {final_held_out:.3f}; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
