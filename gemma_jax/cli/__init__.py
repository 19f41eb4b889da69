"""The gemma-jax command line: a thin layer over the library. User mistakes -> one line, exit 2.

Every command parser comes from `sub.add_parser(...)` (see `_Commands`), which gives it the global
flags (accepted before or after the command), one-line usage errors, and help that shows each
option's default. Library messages name arguments by their flags here (`checks.spelled`).
The serving commands live in `cli/serving.py`, the evaluation ones in `cli/evaluation.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

from gemma_jax import checks, default
from gemma_jax.errors import GemmaError, GemmaWarning, GenerationError, TokenizerError

DEFAULT_COMPILE_CACHE = default.cache_root() / "xla"


class _UsageError(Exception):
    """A command-line mistake found by argparse."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block), reported by main() like any other."""

    def error(self, message: str):
        raise _UsageError(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds '(default: X)' to an option's help where X says something (not None, False or empty);
    a command's usage line leaves out the global flags (its help lists them)."""

    def add_usage(self, usage, actions, groups, prefix=None):
        actions = [a for a in actions if not getattr(a, "global_copy", False)]
        super().add_usage(usage, actions, groups, prefix)

    def _get_help_string(self, action):
        help_text = action.help or ""
        value = action.default
        if "default" in help_text or value is argparse.SUPPRESS or value is None or value is False \
                or value == [] or value == "":
            return help_text
        return help_text + " (default: %(default)s)"


class _Commands(argparse._SubParsersAction):
    """The subcommands. A parser made here takes the global flags too, and shows defaults."""

    def add_parser(self, name, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("description", kwargs.get("help"))
        parser = super().add_parser(name, **kwargs)
        _add_global_flags(parser, defaults=False)
        return parser


def _path(text: str) -> Path:
    """A path argument, with ~ expanded (the shell leaves --flag=~/x alone)."""
    return Path(text).expanduser()


def _version() -> str:
    from gemma_jax import __version__
    deps = []
    for package in ("jax", "flax"):
        try:
            deps.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"gemma-jax {__version__} ({', '.join(deps)})"


def _add_global_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The flags every command takes. On a command's parser (defaults=False) an absent flag sets
    nothing, so it does not undo the same flag given before the command."""
    g = parser.add_argument_group("global options (before or after the command)")

    def flag(*names, default=None, **kwargs):
        action = g.add_argument(*names, default=default if defaults else argparse.SUPPRESS, **kwargs)
        action.global_copy = not defaults
    flag("--version", action="version", version=_version())
    flag("--debug", action="store_true", default=False, help="show tracebacks for errors (raise instead of one line)")
    flag("--compile-cache", type=_path, default=DEFAULT_COMPILE_CACHE, metavar="DIR",
         help=f"persistent XLA compilation cache directory (default: {DEFAULT_COMPILE_CACHE})")
    flag("--no-compile-cache", action="store_true", default=False, help="disable the persistent compilation cache")
    flag("--mesh", metavar="FSDPxTP", help="shard over devices, e.g. 1x8 (generate, chat)")
    flag("--distributed", action="store_true", default=False,
         help="join a multi-host run (jax.distributed.initialize; TPU pods supply the details)")
    flag("--coordinator", metavar="HOST:PORT", help="multi-host coordinator address (implies --distributed)")
    flag("--num-processes", type=int, metavar="N", help="multi-host: number of processes")
    flag("--process-id", type=int, metavar="I", help="multi-host: this process's index")


def _add_sampling(p: argparse.ArgumentParser, max_new_tokens: int, what: str) -> None:
    p.add_argument("--ckpt", type=_path, metavar="DIR",
                   help="a directory made by 'gemma-jax convert' (default: the built-in tiny model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (default: as stored; float32 for the built-in model)")
    _add_quantize(p, "int8 weights: quantize a float checkpoint while loading (an int8 checkpoint is int8 already)")
    p.add_argument("--attention", help="attention implementation: auto (default), xla, blockwise, splash "
                   "(TPU), optionally with options, e.g. blockwise,block_q=256; see docs/accelerators.md")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N", help=f"most tokens {what}")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 is greedy (deterministic); above 0 samples")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens only (with a temperature)")
    p.add_argument("--top-p", type=float, metavar="P",
                   help="sample from the fewest tokens holding probability P (with a temperature)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed for sampling: the same seed repeats the same sample")
    p.add_argument("--stop", dest="stop_strings", action="append", default=[], metavar="TEXT",
                   help="end the reply at TEXT, which is not printed (repeatable)")
    p.add_argument("--system", metavar="TEXT", help="a system instruction, folded into the first user turn "
                   "(Gemma 2 has no system role)" + ("; with --chat" if what == "to generate" else ""))


def _add_quantize(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--quantize", choices=["int8"], help=what)
    p.add_argument("--int8-mode", choices=["dynamic", "weight-only"],
                   help="the int8 product: int8 activations (default on CPU) or weight-only (default on GPU/TPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gemma-jax", formatter_class=_HelpFormatter,
                     epilog="'gemma-jax COMMAND --help' shows a command's options. Global options go before "
                            "or after the command.")
    _add_global_flags(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", action=_Commands)

    p = sub.add_parser("convert", help="convert a Hugging Face Gemma 2 directory to a gemma_jax checkpoint")
    p.add_argument("hf_dir", type=_path, help="the Hugging Face directory (config.json, *.safetensors, tokenizer.model)")
    p.add_argument("out_dir", type=_path, help="the checkpoint directory to create")
    p.add_argument("--dtype", help="float32 or bfloat16 (default: keep the dtype on disk)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR (only once the new one is complete)")
    p.add_argument("--quantize", choices=["int8"],
                   help="store weights as int8 with a scale per output channel (norms stay --dtype)")

    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    _add_sampling(p, 64, "to generate")
    p.add_argument("--prompt", required=True, metavar="TEXT", help='the text to continue ("" starts from BOS alone)')
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (IT models)")

    p = sub.add_parser("chat", help="a multi-turn conversation at the terminal (/help lists its commands)")
    _add_sampling(p, 256, "per reply (fewer when the context is nearly full)")

    p = sub.add_parser("bench", help="measure speed and memory (optionally against HF transformers)")
    p.add_argument("--preset", default="2b", choices=["2b", "9b", "27b", "tiny"], help="random weights of this shape")
    p.add_argument("--ckpt", type=_path, metavar="DIR", help="benchmark a converted checkpoint instead of random weights")
    p.add_argument("--hf-dir", type=_path, metavar="DIR", help="with --vs-hf and --ckpt: the HF directory it came from")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated")
    p.add_argument("--prompt-len", default="64", help="prompt lengths, comma-separated")
    p.add_argument("--sliding-window", type=int, metavar="N", help="override the preset's sliding window")
    p.add_argument("--gen-len", type=int, default=32, metavar="N", help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="report the best of this many decode runs")
    _add_quantize(p, "benchmark int8 weights (random ones quantized, or a float --ckpt quantized while loading)")
    p.add_argument("--vs-float", action="store_true", help="with --quantize: also gemma_jax with float weights")
    p.add_argument("--vs-hf", action="store_true", help="also run HF transformers on identical weights")
    p.add_argument("--json", type=_path, metavar="FILE", help="write every figure to this JSON file")
    p.add_argument("--plot", type=_path, metavar="PNG", help="draw decode tokens/s against batch size to this PNG")

    serving.add_parsers(sub)

    p = sub.add_parser("parity", help="compare per-layer activations and logits with HF transformers")
    p.add_argument("--hf", type=_path, required=True, metavar="DIR", help="a Hugging Face Gemma 2 directory")
    p.add_argument("--ckpt", type=_path, metavar="DIR", help="its converted checkpoint (default: convert into a temp dir)")
    p.add_argument("--length", type=int, default=64, metavar="N", help="tokens per prompt (random ids without a tokenizer)")
    p.add_argument("--tolerance", type=float, default=2e-4, help="max |logit difference| that passes")

    p = sub.add_parser("capture", help="write the activations at hook sites over text files (an SAE training set)")
    p.add_argument("--ckpt", type=_path, metavar="DIR",
                   help="a directory made by 'gemma-jax convert' (default: the built-in tiny model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: as stored)")
    p.add_argument("--text", type=_path, nargs="+", required=True, metavar="FILE", help="UTF-8 text files (documents)")
    p.add_argument("--sites", nargs="+", required=True, help="hook sites or patterns, e.g. 'blocks.6.hook_resid_post'")
    p.add_argument("--out", type=_path, required=True, metavar="DIR",
                   help="output directory (re-run the same command to resume)")
    p.add_argument("--seq-len", type=int, default=128, metavar="N", help="tokens per row, BOS first")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="rows per forward pass")
    p.add_argument("--store-dtype", choices=["float32", "float16"], default="float32", help="dtype on disk")
    p.add_argument("--shard-mb", type=float, default=256, metavar="MIB", help="largest shard in MiB")
    p.add_argument("--max-rows", type=int, metavar="N", help="stop after this many rows")

    evaluation.add_parsers(sub)
    parser.description = f"Gemma 2 in JAX. Commands: {', '.join(sub.choices)}."   # every command, as added
    return parser


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
                  progress=tqdm_progress("converting"), quantize=args.quantize)
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    if not (args.hf_dir / "tokenizer.model").is_file():
        warnings.warn(f"{args.hf_dir} has no tokenizer.model, so {out} works on token ids only: copy the "
                      "model's tokenizer.model into it for 'gemma-jax generate' and 'chat'", GemmaWarning)


def _sampling_kwargs(args) -> dict:
    """The sampling flags, checked before anything is loaded."""
    from gemma_jax.sampler import Sampling
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if sampling.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        warnings.warn("--top-k and --top-p do nothing at --temperature 0 (greedy); give a temperature above 0 "
                      "to sample", GemmaWarning)
    return dict(max_new_tokens=checks.integer("max_new_tokens", args.max_new_tokens, minimum=0),
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=checks.seed(args.seed),
                stop_strings=args.stop_strings)


def _load(args):
    """The checkpoint (--ckpt, else the default model), refused early when it has no tokenizer or a
    bad --attention."""
    from gemma_jax import checkpoint
    from gemma_jax.attention import attention_config
    attention_config(getattr(args, "attention", None))
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
    checkpoint.read_meta(ckpt)   # a missing or broken checkpoint is named before the tokenizer is
    if not (ckpt / "tokenizer.model").is_file():
        raise TokenizerError(f"{ckpt} has no tokenizer.model, so it cannot read or write text: convert from a "
                             "Hugging Face directory that has one, or copy it into the checkpoint")
    start = time.perf_counter()
    if sys.stderr.isatty():
        print(f"loading {ckpt} ...", end="", file=sys.stderr, flush=True)
    model = load(ckpt, dtype=args.dtype or ("float32" if args.ckpt is None else None), mesh=mesh,
                 quantize=getattr(args, "quantize", None), int8_mode=getattr(args, "int8_mode", None),
                 attention=getattr(args, "attention", None))
    if sys.stderr.isatty():
        print(f" done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return model


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _generate(args) -> None:
    kwargs = _sampling_kwargs(args)
    if args.system is not None and not args.chat:
        raise GenerationError("--system needs --chat (it is part of the chat template)")
    model = _load(args)
    shown = []  # the prompt is echoed with the first piece, so a refused request prints nothing

    def show(piece):
        if not shown and not args.chat:
            sys.stdout.write(args.prompt)
        shown.append(piece)
        _write(piece)

    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        model.chat(messages, fold_system=True, stream=show, **kwargs)
    else:
        model.generate(args.prompt, stream=show, **kwargs)
    if not shown and not args.chat:
        sys.stdout.write(args.prompt)
    sys.stdout.write("\n")


CHAT_COMMANDS = {"/help": "list these commands", "/reset": "start a new conversation",
                 "/exit": "end the chat (also Ctrl-D)"}
CHAT_INTRO = "Chat: type a message. Ctrl-C stops a reply; /help lists the commands; /exit or Ctrl-D ends."


def _line_editing() -> None:
    """Line editing and history for input(), where Python has readline (not on Windows)."""
    try:
        import readline  # noqa: F401  (importing it is what turns it on)
    except ImportError:
        pass


@contextlib.contextmanager
def _ctrl_c_as_flag():
    """While a reply streams, Ctrl-C sets a flag (the stream then stops the reply at its next piece)
    instead of raising wherever Python happens to be; a second Ctrl-C raises at once."""
    pressed: list[bool] = []

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:          # not the main thread: leave Ctrl-C as it is
        previous = None
    try:
        yield pressed
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _chat(args) -> None:
    from gemma_jax.chat import ChatSession
    kwargs = _sampling_kwargs(args)
    session = ChatSession(_load(args), system=args.system, **kwargs)
    _line_editing()
    print(CHAT_INTRO, file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D ends the chat)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command = text.split()[0]
            if command == "/exit":
                return
            if command == "/reset":
                session.reset()
                print("(history cleared)", file=sys.stderr)
            elif command == "/help":
                for name, what in CHAT_COMMANDS.items():
                    print(f"  {name:<7} {what}", file=sys.stderr)
                print("  Ctrl-C stops a reply; start a message with // to send one that begins with /",
                      file=sys.stderr)
            else:
                print(f"unknown command {command} (not sent to the model): /help lists the commands; "
                      "start with // to send a message that begins with /", file=sys.stderr)
            continue
        if text.startswith("//"):
            text = text[1:]
        with _ctrl_c_as_flag() as pressed:
            shown = []      # "model> " goes out with the first piece, after any warning about this turn

            def stream(piece):
                if not shown:
                    _write("model> ")
                shown.append(piece)
                _write(piece)
                if pressed:
                    raise KeyboardInterrupt
            try:
                session.send(text, stream=stream)
            except KeyboardInterrupt:
                _write("\n" if shown else "")
                print("(reply stopped)", file=sys.stderr)
                continue
            except GemmaError as e:
                _write("\n" if shown else "")
                print(f"error: {e}", file=sys.stderr)
                continue
        _write("\n" if shown else "model> \n")


def _bench(args) -> None:
    from gemma_jax import bench, bench_report
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
        prompt_lens = tuple(int(p) for p in args.prompt_len.split(","))
    except ValueError:
        raise GenerationError("--batch and --prompt-len take comma-separated integers, e.g. 1,4,16") from None
    if min(batches) < 1 or min(prompt_lens) < 1 or args.gen_len < 2 or args.repeats < 1:
        raise GenerationError("--batch, --prompt-len and --repeats must be >= 1 and --gen-len >= 2")
    spec = bench.BenchSpec(preset=args.preset, ckpt=args.ckpt and str(args.ckpt),
                           hf_dir=args.hf_dir and str(args.hf_dir), dtype=args.dtype, batch_sizes=batches,
                           prompt_lens=prompt_lens, gen_len=args.gen_len, sliding_window=args.sliding_window,
                           repeats=args.repeats, quantize=args.quantize, int8_mode=args.int8_mode)
    if args.vs_float and not args.quantize:
        raise GenerationError("--vs-float compares int8 with float weights: it needs --quantize int8")
    bench.preflight(spec, vs_hf=args.vs_hf, outputs={"--json": args.json, "--plot": args.plot})
    print(bench.plan(spec, vs_hf=args.vs_hf), file=sys.stderr, flush=True)
    result = bench.run(spec, vs_hf=args.vs_hf, progress=True, vs_float=args.vs_float)
    print(bench_report.format_report(result))
    if args.json:
        import json
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        bench_report.plot(result, str(args.plot))


def _parity(args) -> None:
    from gemma_jax import parity
    figures = parity.check(args.hf, args.ckpt, length=args.length)
    print(parity.format_report(figures, args.tolerance))
    if figures["logits"] > args.tolerance:
        raise GenerationError(f"parity: logits differ from HF by {figures['logits']:.2e} > --tolerance "
                              f"{args.tolerance:g}{parity.explanation(figures)}")


def _capture(args) -> None:
    from gemma_jax import capture
    spec = capture.CaptureSpec(tuple(args.sites), args.seq_len, args.batch_size, args.store_dtype,
                               max(1, int(args.shard_mb * (1 << 20))), args.max_rows)
    spec.check()
    model = _load(args)
    manifest = capture.capture(model, args.text, args.out, spec, progress=sys.stderr.isatty())
    print(f"wrote {manifest['rows']} rows ({manifest['tokens']} tokens) of {len(manifest['sites'])} site(s) "
          f"in {len(manifest['shards'])} shard(s) to {args.out}", file=sys.stderr)



from gemma_jax.cli import evaluation, serving  # noqa: E402  (they use the helpers above)

COMMANDS = {"convert": _convert, "generate": _generate, "chat": _chat, "bench": _bench, "serve": serving.serve,
            "bench-serve": serving.bench_serve, "parity": _parity, "capture": _capture, "score": evaluation.score,
            "eval": evaluation.run_eval}


def _flag_names(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """{argument name: its flag} for one command: how library messages name arguments here."""
    commands = next(a for a in parser._actions if isinstance(a, _Commands))
    return {a.dest: a.option_strings[-1] for a in commands.choices[command]._actions
            if a.option_strings and a.option_strings[-1].startswith("--")}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, GemmaWarning):
        print(f"gemma-jax: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0, 2 for a refused input (one line on stderr),
    1 for a bug (with its traceback), 130 when interrupted. --debug re-raises instead."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"gemma-jax: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:     # --help, --version
        return e.code if isinstance(e.code, int) else 0
    try:
        with warnings.catch_warnings(), checks.spelled(_flag_names(parser, args.command)):
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
