"""The TransformerLens-style workflow of docs/interpretability.md on the built-in default model:
cache every site, decompose the residual stream, attribute the logit difference between the
predicted token and the runner-up to the embedding, each layer's attention and MLP, and each head
(exactly: the parts sum to the pre-soft-cap logit difference), and read the logit lens.

    python scripts/tl_workflow.py [--ckpt DIR] [--prompt TEXT] [--out docs/tl_workflow.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gemma_jax  # noqa: E402
from gemma_jax import default  # noqa: E402

PROMPT = "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y ="


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="a converted checkpoint (default: the built-in default model)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--out", default=str(ROOT / "docs" / "tl_workflow.png"))
    args = ap.parse_args(argv)
    model = gemma_jax.load(args.ckpt or default.checkpoint_dir(), dtype="float32")
    tok, cfg = model.tokenizer, model.config

    # 1. cache: every site, one compiled call
    logits, cache = model.run_with_cache(args.prompt)
    last = np.asarray(logits[0, -1])
    answer, other = (int(i) for i in np.argsort(-last)[:2])
    name = lambda i: repr(tok.id_to_piece(i))  # noqa: E731
    print(f"prompt: {args.prompt!r} ({cache['hook_embed'].shape[1]} tokens, {len(cache)} sites cached)")
    print(f"prediction: {name(answer)} (logit {last[answer]:.3f}), runner-up {name(other)} ({last[other]:.3f})")

    # 2. decompose: embed + each layer's attention and MLP output, last position
    parts, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)           # [C, 1, D]
    # 3. attribute: exact parts of the pre-soft-cap logit difference
    attrs = np.asarray(cache.logit_attrs(parts, answer, incorrect_tokens=other, pos_slice=-1))[:, 0]
    pre_cap = np.asarray(cache["unembed.hook_out"][0, -1])
    diff = pre_cap[answer] - pre_cap[other]
    print(f"logit attribution: parts sum to {attrs.sum():.6f}; pre-soft-cap logit difference {diff:.6f}")
    for label, value in sorted(zip(labels, attrs), key=lambda p: -abs(p[1]))[:4]:
        print(f"    {label:<12} {value:+.3f}")
    heads, head_labels = cache.stack_head_results(pos_slice=-1, return_labels=True)   # [L*N, 1, D]
    head_attrs = np.asarray(cache.logit_attrs(heads, answer, incorrect_tokens=other, pos_slice=-1))[:, 0]
    attn_attrs = attrs[[labels.index(f"{i}_attn_out") for i in range(cfg.num_hidden_layers)]]
    per_layer = head_attrs.reshape(cfg.num_hidden_layers, -1)
    print(f"heads: each layer's heads sum to its attention part (max |diff| "
          f"{np.abs(per_layer.sum(1) - attn_attrs).max():.1e}); largest "
          f"{head_labels[int(np.argmax(np.abs(head_attrs)))]} {head_attrs[np.argmax(np.abs(head_attrs))]:+.3f}")

    # 4. logit lens: the residual entering each layer, read through the final norm and unembedding
    lens, lens_labels = cache.logit_lens(return_labels=True)                           # [L+1, 1, V]
    lens = np.asarray(lens)[:, 0]
    probs = np.exp(lens - lens.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    print("logit lens p(prediction): " + ", ".join(f"{lab} {p:.3f}" for lab, p in zip(lens_labels, probs[:, answer])))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    ax = axes[0]
    ax.bar(range(len(labels)), attrs, color=["#888" if lab == "embed" else "#3b75af" if "attn" in lab else "#e0823d"
                                              for lab in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"logit({name(answer)}) - logit({name(other)}) by part\n(sum = pre-soft-cap difference {diff:.2f})",
                 fontsize=9)
    ax = axes[1]
    bound = np.abs(per_layer).max()
    im = ax.imshow(per_layer, cmap="RdBu", vmin=-bound, vmax=bound)
    ax.set_xlabel("head"), ax.set_ylabel("layer")
    ax.set_xticks(range(per_layer.shape[1])), ax.set_yticks(range(per_layer.shape[0]))
    ax.set_title("by head (post-attention norm frozen:\nrows sum to the layer's attention part)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[2]
    ax.plot(range(len(lens_labels)), probs[:, answer], "o-", label=name(answer))
    ax.plot(range(len(lens_labels)), probs[:, other], "s--", label=name(other))
    ax.set_xticks(range(len(lens_labels)), lens_labels, fontsize=8)
    ax.set_ylim(0, 1), ax.legend(fontsize=8)
    ax.set_title("logit lens: probability at the last position", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
