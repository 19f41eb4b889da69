"""The worked example of docs/interpretability.md, end to end.

    python scripts/interp_demo.py --ckpt CONVERTED_DIR [--prompt TEXT] [--out DIR] [--sae params.npz --sae-kind res --sae-layer 12]

Without --ckpt it uses the built-in default model (a tiny Gemma 2 trained on the Python standard
library, converted once into the cache); --random builds a tiny random Gemma 2 with
tests/hf_oracle.py instead (needs the test extra). Steps:
run_with_cache, logit lens, direct logit attribution, an attention-pattern heatmap (PNG), a
patching sweep checked against attribution patching, and an SAE splice (a synthetic SAE written
as a Gemma Scope-style params.npz unless --sae is given). The default prompt (199 tokens) is longer
than the default model's sliding window (128), so the heatmap shows the window.
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gemma_jax  # noqa: E402
from gemma_jax import interp  # noqa: E402
from gemma_jax import sae as saelib  # noqa: E402


def build_tiny(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_oracle import hf_model, save
    hf = hf_model(seed=0, embed_std=0.1, num_hidden_layers=4, sliding_window=4)
    save(hf, work / "hf")
    gemma_jax.convert(work / "hf", work / "ckpt")
    return work / "ckpt"


# ------------------------------------------------------------------------------ heatmap PNG
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """[...] in [0, 1] -> [..., 3] uint8, a five-point piecewise-linear viridis."""
    x = np.clip(values, 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(x.astype(int), len(_VIRIDIS) - 2)
    t = (x - i)[..., None]
    return np.round(_VIRIDIS[i] * (1 - t) + _VIRIDIS[i + 1] * t).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """A minimal 8-bit RGB PNG (no dependencies beyond zlib)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(rgb[y]).tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


MASKED_GREY = (225, 225, 225)
PROMPT = '''class Inventory:
    """Items kept by name, with a count for each."""

    def __init__(self):
        self.counts = {}

    def add(self, name, count=1):
        if count < 0:
            raise ValueError("count must not be negative")
        self.counts[name] = self.counts.get(name, 0) + count

    def remove(self, name, count=1):
        if self.counts.get(name, 0) < count:
            raise KeyError(name)
        self.counts[name] -= count
        if not self.counts[name]:
            del self.counts[name]

    def __len__(self):
        return len(self.counts)

    def __repr__(self):
        return'''


def pattern_grid(patterns: np.ndarray, masked: np.ndarray, cell: int | None = None, gap: int = 6) -> np.ndarray:
    """patterns, masked [R, N, T, S] -> RGB image: one row per layer, one tile per head; masked
    (invisible) keys light grey, visible keys coloured by probability. Tiles about 400 px wide."""
    r, n, t, s = patterns.shape
    cell = cell or max(1, 400 // max(t, s))
    tile_h, tile_w = t * cell, s * cell
    img = np.full((r * tile_h + (r + 1) * gap, n * tile_w + (n + 1) * gap, 3), 255, np.uint8)
    for row in range(r):
        for head in range(n):
            tile = colormap(patterns[row, head])
            tile[masked[row, head]] = MASKED_GREY
            tile = tile.repeat(cell, 0).repeat(cell, 1)
            y, x = gap + row * (tile_h + gap), gap + head * (tile_w + gap)
            img[y:y + tile_h, x:x + tile_w] = tile
    return img


def save_heatmap(path: Path, patterns, masked, layers) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path.write_bytes(png_bytes(pattern_grid(patterns, masked)))
        return "pure-NumPy PNG writer (matplotlib not installed)"
    r, n = patterns.shape[:2]
    cmap = plt.get_cmap("viridis").with_extremes(bad=np.array(MASKED_GREY) / 255)   # masked keys: the grey of the legend
    fig, axes = plt.subplots(r, n, figsize=(2.2 * n, 2.2 * r), squeeze=False)
    for row in range(r):
        for head in range(n):
            ax = axes[row, head]
            ax.imshow(np.ma.masked_where(masked[row, head], patterns[row, head]), vmin=0, vmax=1, cmap=cmap,
                      interpolation="nearest")
            ax.set_title(f"L{layers[row]} H{head}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    fig.supxlabel("key position"), fig.supylabel("query position")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


# ------------------------------------------------------------------------------ synthetic SAE
def synthetic_sae(acts: np.ndarray, path: Path) -> Path:
    """A Gemma Scope-layout params.npz fitted to activations `acts` [N, d] in closed form: features
    are the +/- principal directions (so JumpReLU's positive part of each projection rebuilds it),
    thresholds at each feature's 70th percentile so only the larger projections fire."""
    mean = acts.mean(0)
    _, _, vt = np.linalg.svd(acts - mean, full_matrices=False)
    w_dec = np.concatenate([vt, -vt])                                   # [2r, d], unit rows
    pre = (acts - mean) @ w_dec.T
    threshold = np.maximum(np.percentile(pre, 70, axis=0), 1e-3)
    np.savez(path, W_enc=w_dec.T.astype(np.float32), W_dec=w_dec.astype(np.float32),
             b_enc=(-mean @ w_dec.T).astype(np.float32), b_dec=mean.astype(np.float32),
             threshold=threshold.astype(np.float32))
    return path


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="a converted gemma_jax checkpoint directory (default: the built-in model)")
    ap.add_argument("--random", action="store_true", help="use a tiny random model instead of the built-in one")
    ap.add_argument("--prompt", default=PROMPT, help="text (when the checkpoint has tokenizer.model); default: "
                    "a 199-token class, longer than the default model's sliding window")
    ap.add_argument("--out", help="directory for the PNG and the synthetic SAE (default: a temp dir)")
    ap.add_argument("--sae", help="a Gemma Scope params.npz (default: a synthetic SAE)")
    ap.add_argument("--sae-kind", default="res", choices=sorted(saelib.SITES))
    ap.add_argument("--sae-layer", type=int, help="default: the middle layer")
    ap.add_argument("--sweep-sites", default="blocks.*.hook_resid_pre", help="site pattern for the patching sweep")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out).expanduser() if args.out else Path(tempfile.mkdtemp(prefix="gemma_jax_interp_"))
    out.mkdir(parents=True, exist_ok=True)

    if args.ckpt is None and not args.random:
        from gemma_jax import default
        print(f"no --ckpt: using {default.DESCRIPTION}")
        ckpt = default.checkpoint_dir()
    elif args.ckpt is None:
        print(f"--random: building a tiny RANDOM Gemma 2 (4 layers, window 4) with tests/hf_oracle.py in {out}; "
              "the numbers below exercise the tools, they mean nothing about language")
        ckpt = build_tiny(out)
    else:
        ckpt = Path(args.ckpt).expanduser()
    model = gemma_jax.load(ckpt, dtype="float32")
    cfg = model.config
    tok = model.tokenizer
    if tok is not None:
        ids = np.array([tok.encode(args.prompt)])
        label = tok.id_to_piece
    else:
        ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 5 * cfg.sliding_window if
                                                                         cfg.sliding_window < 8 else 16))
        label = lambda i: f"#{i}"  # noqa: E731
        print(f"no tokenizer in {ckpt}: using {ids.shape[1]} random token ids")
    n_layers, t = cfg.num_hidden_layers, ids.shape[1]
    print(f"model: {n_layers} layers, d_model {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
          f"window {cfg.sliding_window}; prompt of {t} tokens")

    # 1. run_with_cache: every requested site in one compiled call
    logits, cache = interp.run_with_cache(model, ids, ["blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern",
                                                       "blocks.*.attn.hook_attn_scores"])
    top = int(logits[0, -1].argmax())
    print(f"[1] run_with_cache: {len(cache)} sites, e.g. blocks.0.hook_resid_post {cache['blocks.0.hook_resid_post'].shape}, "
          f"blocks.0.attn.hook_pattern {cache['blocks.0.attn.hook_pattern'].shape}; next token {label(top)!r}")

    # 2. logit lens at the last position
    lens = interp.logit_lens(model, ids)
    print("[2] logit lens (last position): top token and its probability after each layer")
    for layer in range(n_layers):
        row = lens[layer, 0, -1]
        p = np.exp(row - row.max())
        p /= p.sum()
        print(f"      layer {layer:2d}: {label(int(row.argmax()))!r:>14} p={p.max():.3f}   "
              f"p(final top)={p[top]:.3f}")
    print(f"      (the last layer's lens is the model's output: max|diff| {np.abs(lens[-1] - logits).max():.1e})")

    # 3. direct logit attribution of the top token
    names, contrib, pre_cap = interp.direct_logit_attribution(model, ids, [top])
    order = np.argsort(-np.abs(contrib[:, 0]))[:5]
    print(f"[3] direct logit attribution to {label(top)!r} (pre-cap logit {pre_cap[0]:.3f}, "
          f"linearized sum {contrib[:, 0].sum():.3f}, actual logit {logits[0, -1, top]:.3f}); largest:")
    for i in order:
        print(f"      {names[i]:<28} {contrib[i, 0]:+.3f}")

    # 4. attention patterns: the first sliding and the first global layer
    shown = sorted({next((i for i in range(n_layers) if cfg.is_sliding(i)), 0),
                    next((i for i in range(n_layers) if not cfg.is_sliding(i)), n_layers - 1)})
    patterns = np.stack([cache[f"blocks.{i}.attn.hook_pattern"][0] for i in shown])
    masked = np.stack([cache[f"blocks.{i}.attn.hook_attn_scores"][0] < -1e30 for i in shown])
    png = out / "attention_patterns.png"
    how = save_heatmap(png, patterns, masked, shown)
    print(f"[4] attention patterns of layers {shown} ({'sliding' if cfg.is_sliding(shown[0]) else 'global'} first), "
          f"one row per layer, one tile per head (query down, key across, grey = masked): {png} via {how}")

    # 5. patching sweep: corrupt one position, patch clean activations back one (site, position) at a time
    # the position to corrupt: of the last 12 tokens, the one whose change lowers the top logit most
    candidates = np.arange(max(0, t - 13), t - 1)
    variants = np.repeat(ids, len(candidates), 0)
    variants[np.arange(len(candidates)), candidates] = (ids[0, candidates] + 1) % cfg.vocab_size
    pos = int(candidates[np.argmax(logits[0, -1, top] - model.logits(variants)[:, -1, top])])
    corrupt = ids.copy()
    corrupt[0, pos] = (ids[0, pos] + 1) % cfg.vocab_size
    corrupt_logits = model.logits(corrupt)
    other = int(np.argsort(corrupt_logits[0, -1])[-1 if corrupt_logits[0, -1].argmax() != top else -2])

    def metric(lg):
        return lg[0, -1, top] - lg[0, -1, other]
    clean_m, corrupt_m = float(metric(logits)), float(metric(corrupt_logits))
    sites, sweep = interp.patching_sweep(model, ids, corrupt, args.sweep_sites, metric)
    attr = interp.attribution_patching(model, ids, corrupt, sites, metric)
    recovered = (sweep - corrupt_m) / (clean_m - corrupt_m)
    shown_pos = np.flatnonzero(np.abs(recovered).max(0) >= 0.005)
    shown_pos = np.sort(shown_pos[np.argsort(-np.abs(recovered[:, shown_pos]).max(0))][:12])   # the 12 largest
    print(f"[5] patching sweep over {args.sweep_sites}: token {pos} corrupted; metric = logit({label(top)!r}) - "
          f"logit({label(other)!r}): clean {clean_m:.3f}, corrupt {corrupt_m:.3f}. Fraction recovered "
          f"(rows: sites; columns: the positions of largest effect, at most 12; '.' = |x| < 0.005):")
    print(f"      {'position':<26}" + " ".join(f"{p:>5d}" for p in shown_pos))
    for name, row in zip(sites, recovered):
        print(f"      {name:<26}" + " ".join("    ." if abs(v) < 0.005 else f"{v:+5.2f}" for v in row[shown_pos]))
    est = np.stack([attr[n][0] for n in sites])
    effect = sweep - corrupt_m
    live = np.abs(effect) > 1e-6
    corr = np.corrcoef(est[live], effect[live])[0, 1] if live.sum() > 2 else float("nan")
    print(f"      attribution patching (one backward pass) vs the sweep: correlation {corr:.3f} "
          f"over {int(live.sum())} non-zero entries")

    # 6. SAE splice
    layer = n_layers // 2 if args.sae_layer is None else args.sae_layer
    site = saelib.site_for(args.sae_kind, layer)
    if args.sae is None:
        _, acts = interp.run_with_cache(model, ids, [site])
        x = acts[site].reshape(-1, acts[site].shape[-1]).astype(np.float64)
        sae_path = synthetic_sae(x, out / "params.npz")
        print(f"[6] SAE: synthetic, Gemma Scope layout, written to {sae_path}")
    else:
        sae_path = Path(args.sae).expanduser()
        print(f"[6] SAE: {sae_path}")
    sae = saelib.JumpReLUSAE.load(sae_path)
    spliced, stats = saelib.splice(model, ids, sae, site)
    exact, _ = saelib.splice(model, ids, sae, site, use_error_term=True)
    feats = np.asarray(sae.encode(np.asarray(interp.run_with_cache(model, ids, [site])[1][site])))
    feature = int(np.argmax(feats[0, -1]))
    steered = interp.run_with_hooks(model, ids, {site: saelib.steering_hook(sae, feature, 8.0)})
    print(f"      at {site}: d_sae {sae.W_enc.shape[1]}, mean L0 {stats['l0'].mean():.1f}, "
          f"variance explained {stats['variance_explained']:.3f}")
    print(f"      spliced logits: max|dlogit| {np.abs(spliced - logits).max():.3f}, next token "
          f"{label(int(spliced[0, -1].argmax()))!r}; with the error term max|dlogit| {np.abs(exact - logits).max():.1e}")
    print(f"      steering with feature {feature} (x8): next token {label(int(steered[0, -1].argmax()))!r}, "
          f"max|dlogit| {np.abs(steered - logits).max():.3f}")
    print(f"done in {time.perf_counter() - start:.1f}s; outputs in {out}")


if __name__ == "__main__":
    main()
