"""The gemma-jax command line: a thin layer over the library. User mistakes -> one line, exit 2."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

from gemma_jax import default
from gemma_jax.errors import GemmaError, GemmaWarning, GenerationError

DEFAULT_COMPILE_CACHE = default.cache_root() / "xla"


class _UsageError(Exception):
    """A command-line mistake found by argparse."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block), reported by main() like any other."""

    def error(self, message: str):
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _add_sampling(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--ckpt", help="a directory made by 'gemma-jax convert' (default: the built-in tiny model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: as stored)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gemma-jax", description="Gemma 2 in JAX: convert, generate, chat, score, eval.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--compile-cache", type=Path, default=DEFAULT_COMPILE_CACHE,
                        help=f"persistent XLA compilation cache directory (default: {DEFAULT_COMPILE_CACHE})")
    parser.add_argument("--no-compile-cache", action="store_true", help="disable the persistent compilation cache")
    parser.add_argument("--mesh", help="shard over devices as FSDPxTP, e.g. 1x8 (generate, chat)")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-host run (jax.distributed.initialize; TPU pods supply the details)")
    parser.add_argument("--coordinator", help="multi-host coordinator address HOST:PORT (implies --distributed)")
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's index")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face Gemma 2 directory to a gemma_jax checkpoint")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", help="float32 or bfloat16 (default: keep the dtype on disk)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR (only once the new one is complete)")

    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    _add_sampling(p, 64)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (IT models)")

    p = sub.add_parser("chat", help="a multi-turn conversation at the terminal (/reset, /exit, Ctrl-D)")
    _add_sampling(p, 512)

    p = sub.add_parser("bench", help="measure speed and memory (optionally against HF transformers)")
    p.add_argument("--preset", default="2b", choices=["2b", "9b", "27b", "tiny"], help="random weights of this shape")
    p.add_argument("--ckpt", help="benchmark a converted checkpoint instead of random weights")
    p.add_argument("--hf-dir", help="with --vs-hf and --ckpt: the HF directory it came from")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1)")
    p.add_argument("--prompt-len", default="64", help="prompt lengths, comma-separated (default 64)")
    p.add_argument("--sliding-window", type=int, help="override the preset's sliding window")
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="report the best of this many decode runs (default 3)")
    p.add_argument("--vs-hf", action="store_true", help="also run HF transformers on identical weights")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file")
    p.add_argument("--plot", type=Path, help="draw decode tokens/s against batch size to this PNG")

    p = sub.add_parser("parity", help="compare per-layer activations and logits with HF transformers")
    p.add_argument("--hf", type=Path, required=True, help="a Hugging Face Gemma 2 directory")
    p.add_argument("--ckpt", type=Path, help="its converted checkpoint (default: convert into a temp dir)")
    p.add_argument("--length", type=int, default=64, help="tokens per prompt (random ids without a tokenizer)")
    p.add_argument("--tolerance", type=float, default=2e-4, help="max |logit difference| that passes")
    _add_evaluation(sub)
    return parser


def _add_evaluation(sub) -> None:
    """`score` and `eval` (docs/evaluation.md)."""
    p = sub.add_parser("score", help="perplexity and bits per byte of text files (rolling windows), as JSON")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files")
    p.add_argument("--ckpt", help="a directory made by 'gemma-jax convert' (default: the built-in tiny model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: as stored)")
    p.add_argument("--window", type=int, help="tokens fed per forward (default: max_position_embeddings)")
    p.add_argument("--stride", type=int, help="tokens scored per window after the first (default: window // 2)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per forward (default 2048)")
    p.add_argument("--output", type=Path, help="also write the JSON to this file")
    p.set_defaults(temperature=0.0, top_k=None, top_p=None, max_new_tokens=0)  # what _load checks

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks on the model (needs the eval extra)")
    p.add_argument("--ckpt", help="a directory made by 'gemma-jax convert' (default: the built-in tiny model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: as stored)")
    p.add_argument("--tasks", required=True, help="task names, comma-separated")
    p.add_argument("--limit", type=float, help="examples per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--include-path", type=Path, help="a directory of local task YAML files")
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per forward (default 2048)")
    p.add_argument("--output", type=Path, help="write lm-eval's results as JSON to this file")
    p.add_argument("--sae", type=Path, help="a Gemma Scope params.npz spliced in at --sae-site (steered evaluation)")
    p.add_argument("--sae-site", help="the hook site of --sae, e.g. blocks.12.hook_resid_post")
    p.add_argument("--sae-steer", action="append", default=[], metavar="FEATURE=SCALE",
                   help="add SCALE to an SAE feature's activation (repeatable)")
    p.add_argument("--sae-reconstruct", action="store_true",
                   help="run on the SAE's reconstruction (no error term): the SAE's downstream cost")
    p.set_defaults(temperature=0.0, top_k=None, top_p=None, max_new_tokens=0)  # what _load checks


def _setup_jax(args) -> None:
    import jax
    if args.distributed or args.coordinator:
        from gemma_jax.sharding import initialize_distributed
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if not args.no_compile_cache:
        try:
            args.compile_cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            warnings.warn(f"{args.compile_cache}: cannot create the compilation cache ({e.strerror or e}); "
                          "running without it", GemmaWarning)
            return
        jax.config.update("jax_compilation_cache_dir", str(args.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _convert(args) -> None:
    from gemma_jax.convert import convert, tqdm_progress
    start = time.perf_counter()
    out = convert(args.hf_dir, args.out_dir, dtype=args.dtype, force=args.force,
                  progress=tqdm_progress("converting"))
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s", file=sys.stderr)


def _load(args):
    """Check the sampling arguments (before spending time on loading), then load the checkpoint."""
    from gemma_jax.sampler import Sampling
    Sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0:
        raise GenerationError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    from gemma_jax.api import load
    mesh = None
    if args.mesh:
        from gemma_jax.sharding import make_mesh, parse_mesh
        mesh = make_mesh(*parse_mesh(args.mesh))
    ckpt = args.ckpt
    if ckpt is None:
        from gemma_jax.convert import tqdm_progress
        print(f"gemma-jax: using {default.DESCRIPTION}; pass --ckpt DIR for real weights", file=sys.stderr)
        ckpt = default.checkpoint_dir(progress=tqdm_progress("converting the default model"))
    start = time.perf_counter()
    if sys.stderr.isatty():
        print(f"loading {ckpt} ...", end="", file=sys.stderr, flush=True)
    model = load(ckpt, dtype=args.dtype or ("float32" if args.ckpt is None else None), mesh=mesh)
    if sys.stderr.isatty():
        print(f" done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return model


def _sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)


def _generate(args) -> None:
    model = _load(args)
    shown = []  # the prompt is echoed with the first piece, so a refused request prints nothing

    def show(piece):
        if not shown and not args.chat:
            sys.stdout.write(args.prompt)
        shown.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    if args.chat:
        model.chat([{"role": "user", "content": args.prompt}], stream=show, **_sampling_kwargs(args))
    else:
        model.generate(args.prompt, stream=lambda _row, piece: show(piece), **_sampling_kwargs(args))
    if not shown and not args.chat:
        sys.stdout.write(args.prompt)
    sys.stdout.write("\n")


def _chat(args) -> None:
    from gemma_jax.chat import ChatSession
    session = ChatSession(_load(args), **_sampling_kwargs(args))
    print("Chat: /reset starts over, /exit or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        sys.stdout.write("model> ")
        try:
            session.send(text, stream=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        except GemmaError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")


def _bench(args) -> None:
    from gemma_jax import bench
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
        prompt_lens = tuple(int(p) for p in args.prompt_len.split(","))
    except ValueError:
        raise GenerationError("--batch and --prompt-len take comma-separated integers, e.g. 1,4,16") from None
    if min(batches) < 1 or min(prompt_lens) < 1 or args.gen_len < 2 or args.repeats < 1:
        raise GenerationError("--batch, --prompt-len and --repeats must be >= 1 and --gen-len >= 2")
    spec = bench.BenchSpec(preset=args.preset, ckpt=args.ckpt, hf_dir=args.hf_dir, dtype=args.dtype,
                           batch_sizes=batches, prompt_lens=prompt_lens, gen_len=args.gen_len,
                           sliding_window=args.sliding_window, repeats=args.repeats)
    if args.vs_hf and args.ckpt and not args.hf_dir:
        raise GenerationError("--vs-hf with --ckpt needs --hf-dir (the HF directory it was converted from)")
    result = bench.run(spec, vs_hf=args.vs_hf, progress=sys.stderr.isatty())
    print(bench.format_report(result))
    if args.json:
        import json
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        bench.plot(result, str(args.plot))


def _parity(args) -> None:
    from gemma_jax import parity
    figures = parity.check(args.hf, args.ckpt, length=args.length)
    print(parity.format_report(figures, args.tolerance))
    if figures["logits"] > args.tolerance:
        raise GenerationError(f"parity: logits differ from HF by {figures['logits']:.2e} > {args.tolerance:g}")


def _score_files(args) -> None:
    import json

    from gemma_jax.evaluation import Batching, perplexity
    batching = Batching(max_tokens=args.batch_tokens)
    figures = perplexity.score_files(_load(args), args.files, args.window, args.stride, batching,
                                     progress=sys.stderr.isatty())
    text = json.dumps({"ckpt": args.ckpt or "default", **figures}, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


def _eval(args) -> None:
    from gemma_jax.evaluation import load_harness
    harness = load_harness()
    print(harness.run_eval(_load(args), args.tasks, args.limit, args.num_fewshot, args.include_path,
                           args.batch_tokens, args.sae, args.sae_site, tuple(args.sae_steer),
                           args.sae_reconstruct, args.output))


COMMANDS = {"convert": _convert, "generate": _generate, "chat": _chat, "bench": _bench, "parity": _parity,
            "score": _score_files, "eval": _eval}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, GemmaWarning):
        print(f"gemma-jax: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0, 2 for a refused input (one line on stderr),
    1 for a bug (with its traceback), 130 when interrupted. --debug re-raises instead."""
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        print(f"gemma-jax: error: {e}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            _setup_jax(args)
            COMMANDS[args.command](args)
    except GemmaError as e:
        if args.debug:
            raise
        print(f"gemma-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        traceback.print_exc()
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"gemma-jax: internal error: {type(e).__name__}{': ' + detail if detail else ''} "
              "(a bug: please report it with the traceback above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
