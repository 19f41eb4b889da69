"""The evaluation commands: `score` (perplexity of text files) and `eval` (lm-evaluation-harness
tasks); docs/evaluation.md."""

from __future__ import annotations

import sys

from gemma_jax.cli import _load, _path


def add_parsers(sub) -> None:
    """`score` and `eval`."""
    p = sub.add_parser("score", help="perplexity and bits per byte of text files (rolling windows), as JSON")
    p.add_argument("files", nargs="+", type=_path, metavar="FILE", help="UTF-8 text files")
    p.add_argument("--ckpt", type=_path, metavar="DIR",
                   help="a directory made by 'gemma-jax convert' (default: the built-in tiny model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: as stored)")
    p.add_argument("--window", type=int, help="tokens fed per forward (default: max_position_embeddings)")
    p.add_argument("--stride", type=int, help="tokens scored per window after the first (default: window // 2)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per forward")
    p.add_argument("--output", type=_path, help="also write the JSON to this file")

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks on the model (needs the eval extra)")
    p.add_argument("--ckpt", type=_path, metavar="DIR",
                   help="a directory made by 'gemma-jax convert' (default: the built-in tiny model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: as stored)")
    p.add_argument("--tasks", required=True, help="task names, comma-separated")
    p.add_argument("--limit", type=float, help="examples per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--include-path", type=_path, help="a directory of local task YAML files")
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per forward")
    p.add_argument("--output", type=_path, help="write lm-eval's results as JSON to this file")
    p.add_argument("--sae", type=_path, help="a Gemma Scope params.npz spliced in at --sae-site (steered evaluation)")
    p.add_argument("--sae-site", help="the hook site of --sae, e.g. blocks.12.hook_resid_post")
    p.add_argument("--sae-steer", action="append", default=[], metavar="FEATURE=SCALE",
                   help="add SCALE to an SAE feature's activation (repeatable)")
    p.add_argument("--sae-reconstruct", action="store_true",
                   help="run on the SAE's reconstruction (no error term): the SAE's downstream cost")


def score(args) -> None:
    import json

    from gemma_jax.evaluation import Batching, perplexity
    batching = Batching(max_tokens=args.batch_tokens)
    figures = perplexity.score_files(_load(args), args.files, args.window, args.stride, batching,
                                     progress=sys.stderr.isatty())
    text = json.dumps({"ckpt": str(args.ckpt) if args.ckpt else "default", **figures}, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


def run_eval(args) -> None:
    from gemma_jax.evaluation import load_harness
    harness = load_harness()
    print(harness.run_eval(_load(args), args.tasks, args.limit, args.num_fewshot, args.include_path,
                           args.batch_tokens, args.sae, args.sae_site, tuple(args.sae_steer),
                           args.sae_reconstruct, args.output))
