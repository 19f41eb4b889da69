"""Evaluation speed: lm-eval loglikelihood requests per second on the Gemma 2 2B shape in float32 on
the CPU, gemma_jax's backend against lm-eval's HF backend (HFLM) on the same weights and the same
requests; and the default model over a 1,000-request local multiple-choice task.

    python scripts/bench_eval.py prepare --dir /tmp/gemma_jax_bench_eval   # 2B-shaped bf16 HF dir + its conversion (10.5 GB)
    python scripts/bench_eval.py run --dir /tmp/gemma_jax_bench_eval --json docs/bench_eval.json
    python scripts/bench_eval.py default-task --json docs/bench_eval_default.json
    python scripts/bench_eval.py write-task DIR     # that task's files, for gemma-jax eval --include-path DIR
    rm -r /tmp/gemma_jax_bench_eval

`run` starts one process per side, one after the other (they never share memory or cores); both
load the same bf16 weights as float32. Where one run would be too long, run the sides on their own
and combine them:

    python scripts/bench_eval.py side jax --questions 3 > jax.json
    python scripts/bench_eval.py side hf --questions 3 > hf.json
    python scripts/bench_eval.py combine jax.json hf.json --json docs/bench_eval.json
 The requests are built from English docstrings of the
standard library with the real Gemma 2 tokenizer, in the shapes of the standard tasks:
HellaSwag-like (a 60-120 token context, four 15-30 token endings), ARC-like (a question, four 1-8
token answers) and LAMBADA-like (a 100-200 token context, one word).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def cpu_model() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(isa)}"


# ------------------------------------------------------------------------------------ requests
def sentences(limit: int = 4000) -> list[str]:
    """English sentences from the docstrings of the standard library (deterministic per Python)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
                text = " ".join(ast.get_docstring(node).split())
                out += [s.strip() + "." for s in text.split(". ") if 20 <= len(s) <= 300]
        if len(out) >= limit:
            break
    return out[:limit]


def build_requests(tokenizer, questions: int, seed: int = 0) -> list[tuple[str, str]]:
    """(context, continuation) pairs in the shapes of HellaSwag, ARC and LAMBADA."""
    rng = np.random.default_rng(seed)
    pool = sentences()
    ntok = {s: len(tokenizer.encode(s, add_bos=False)) for s in pool}
    endings = [s for s in pool if 15 <= ntok[s] <= 30]
    answers = [" ".join(s.split()[:k]) for s, k in zip(pool, rng.integers(1, 6, len(pool)))]

    def context(low, high):
        target, parts = rng.integers(low, high + 1), []
        while sum(ntok[p] for p in parts) < target:
            parts.append(pool[rng.integers(len(pool))])
        return " ".join(parts)

    out = []
    for _ in range(questions):                                       # HellaSwag-like
        ctx = context(60, 120)
        out += [(ctx, " " + endings[rng.integers(len(endings))]) for _ in range(4)]
    for _ in range(questions):                                       # ARC-like
        ctx = f"Question: {pool[rng.integers(len(pool))]}\nAnswer:"
        out += [(ctx, " " + answers[rng.integers(len(answers))]) for _ in range(4)]
    for _ in range(max(1, 2 * questions // 3)):                      # LAMBADA-like
        text = context(100, 200).split()
        out.append((" ".join(text[:-1]), " " + text[-1]))
    return out


# ---------------------------------------------------------------------------------------- sides
def _instances(requests):
    from lm_eval.api.instance import Instance
    return [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]


def jax_side(args) -> dict:
    import gemma_jax
    from gemma_jax.evaluation import harness, scoring
    start = time.perf_counter()
    model = gemma_jax.load(Path(args.dir) / "ckpt", dtype="float32")
    lm = harness.GemmaLM(model, batch_tokens=args.batch_tokens)
    out = {"side": "gemma_jax", "load_s": time.perf_counter() - start, "passes": []}
    requests = build_requests(model.tokenizer, args.questions)
    for _ in range(2):   # cold (compiles), then warm
        start = time.perf_counter()
        results = lm.loglikelihood(_instances(requests), disable_tqdm=True)
        out["passes"].append(time.perf_counter() - start)
        print(f"gemma_jax pass: {out['passes'][-1]:.1f}s, {scoring.compiled_programs()} programs", file=sys.stderr)
    out.update(requests=len(requests), programs=scoring.compiled_programs(), results=results,
               tokens=sum(len(c) + len(k) for c, k in (lm._encode_pair(c, k) for c, k in requests)))
    return out


def hf_side(args) -> dict:
    import torch
    from lm_eval.models.huggingface import HFLM

    from gemma_jax.tokenizer import Tokenizer
    torch.set_num_threads(os.cpu_count())
    requests = build_requests(Tokenizer.load(Path(args.dir) / "hf"), args.questions)
    out = {"side": "hflm", "threads": torch.get_num_threads(), "runs": []}
    for batch in args.hf_batch:
        start = time.perf_counter()
        lm = HFLM(pretrained=str(Path(args.dir) / "hf"), device="cpu", dtype="float32", batch_size=batch)
        load = time.perf_counter() - start
        start = time.perf_counter()
        results = lm.loglikelihood(_instances(requests), disable_tqdm=True)
        out["runs"].append({"batch_size": batch, "load_s": load, "seconds": time.perf_counter() - start,
                            "results": results})
        print(f"hflm batch {batch}: {out['runs'][-1]['seconds']:.1f}s", file=sys.stderr)
        del lm
    out["requests"] = len(requests)
    return out


def _child(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "side", side, "--dir", args.dir, "--questions", str(args.questions),
           "--batch-tokens", str(args.batch_tokens), "--hf-batch", *map(str, args.hf_batch)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{side} side failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    return combine(_child("jax", args), _child("hf", args), args.batch_tokens)


def combine(ours: dict, theirs: dict, batch_tokens: int) -> dict:
    """The figures of one run from the two sides' outputs."""
    n = ours["requests"]
    best = min(theirs["runs"], key=lambda r: r["seconds"])
    figures = {
        "cpu": cpu_model(), "requests": n, "tokens": ours["tokens"], "batch_tokens": batch_tokens,
        "gemma_jax": {"load_s": ours["load_s"], "cold_s": ours["passes"][0], "warm_s": ours["passes"][1],
                      "cold_req_per_s": n / ours["passes"][0], "warm_req_per_s": n / ours["passes"][1],
                      "programs": ours["programs"]},
        "hflm": [{"batch_size": r["batch_size"], "load_s": r["load_s"], "seconds": r["seconds"],
                  "req_per_s": n / r["seconds"]} for r in theirs["runs"]],
        "threads": theirs["threads"],
    }
    figures["speedup_warm"] = best["seconds"] / ours["passes"][1]
    figures["speedup_cold"] = best["seconds"] / ours["passes"][0]
    diffs = [abs(a[0] - b[0]) for a, b in zip(ours["results"], best["results"])]
    figures["max_abs_loglikelihood_diff"] = max(diffs)
    figures["same_is_greedy"] = all(a[1] == b[1] for a, b in zip(ours["results"], best["results"]))
    return figures


def prepare(args) -> None:
    from bench_convert import make_checkpoint

    import gemma_jax
    root = Path(args.dir)
    if root.exists():
        raise SystemExit(f"{root} exists: remove it first")
    tokenizer_dir = Path(os.environ.get("GEMMA_JAX_TOKENIZER_DIR") or ROOT.parent / "shared/fixtures/gemma2-tokenizer")
    start = time.perf_counter()
    make_checkpoint(root / "hf", "2b")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, root / "hf" / name)
    gemma_jax.convert(root / "hf", root / "ckpt")
    print(f"wrote {root} in {time.perf_counter() - start:.0f}s", file=sys.stderr)


# ------------------------------------------------------------------------- the default model's task
TASK = "stdlib_next_line"


def write_next_line_task(directory: Path, questions: int = 250) -> str:
    """A local lm-eval task for the default model: `questions` held-out standard-library snippets
    (files scripts/train_tiny.py held out of training), eight lines each, and four candidate next
    lines (the true one and three from elsewhere): 4 * questions loglikelihood requests."""
    import hashlib
    rng = np.random.default_rng(0)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held = sorted(f for f in stdlib.rglob("*.py") if hashlib.sha256(f.name.encode()).digest()[0] < 13
                  and not {"site-packages", "test", "tests", "idlelib"} & set(f.relative_to(stdlib).parts))
    lines = [(f, i, line) for f in held for i, line in enumerate(f.read_text(encoding="utf-8").splitlines())]
    candidates = [k for k, (_, i, line) in enumerate(lines) if i >= 8 and len(line.strip()) >= 12]
    docs = []
    for k in rng.choice(candidates, questions, replace=False):
        context = "\n".join(l for _, _, l in lines[k - 8:k]) + "\n"
        wrong = [lines[j][2] for j in rng.choice(candidates, 3, replace=False)]
        label = int(rng.integers(4))
        docs.append({"context": context, "choices": wrong[:label] + [lines[k][2]] + wrong[label:], "label": label})
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{TASK}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {directory / (TASK + '.jsonl')}\noutput_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")
    return TASK


def default_task(args) -> dict:
    """The 1,000-request task through `gemma-jax eval` on the built-in default model, wall time."""
    import io
    from contextlib import redirect_stdout

    from gemma_jax import cli
    with tempfile.TemporaryDirectory() as tmp:
        write_next_line_task(Path(tmp), args.questions)
        out = Path(tmp) / "results.json"
        argv = ["eval", "--tasks", TASK, "--include-path", tmp, "--output", str(out)]
        start = time.perf_counter()
        with redirect_stdout(io.StringIO()):
            status = cli.main(argv)
        wall = time.perf_counter() - start
        if status != 0:
            raise SystemExit(f"gemma-jax eval failed ({status})")
        results = json.loads(out.read_text())
    return {"cpu": cpu_model(), "requests": 4 * args.questions, "wall_s": wall,
            "accuracy": results["results"][TASK]["acc,none"], "command": "gemma-jax " + " ".join(argv)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dir", default="/tmp/gemma_jax_bench_eval")
    for name in ("run", "side"):
        p = sub.add_parser(name)
        if name == "side":
            p.add_argument("which", choices=["jax", "hf"])
        p.add_argument("--dir", default="/tmp/gemma_jax_bench_eval")
        p.add_argument("--questions", type=int, default=12, help="questions of each shape (default 12: 104 requests)")
        p.add_argument("--batch-tokens", type=int, default=2048)
        p.add_argument("--hf-batch", type=int, nargs="+", default=[1], help="HFLM batch sizes to time")
        p.add_argument("--json", type=Path)
    p = sub.add_parser("combine", help="the figures from two `side` outputs (each side run on its own)")
    p.add_argument("jax_json", type=Path)
    p.add_argument("hf_json", type=Path)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--json", type=Path)
    p = sub.add_parser("default-task")
    p.add_argument("--questions", type=int, default=250)
    p.add_argument("--json", type=Path)
    p = sub.add_parser("write-task", help="write the default model's task (YAML + JSONL) into a directory")
    p.add_argument("dir", type=Path)
    p.add_argument("--questions", type=int, default=250)
    args = parser.parse_args()
    if args.command == "prepare":
        return prepare(args)
    if args.command == "write-task":
        print(f"wrote task {write_next_line_task(args.dir, args.questions)} into {args.dir}")
        return
    if args.command == "side":
        print(json.dumps(jax_side(args) if args.which == "jax" else hf_side(args)))
        return
    if args.command == "combine":
        figures = combine(json.loads(args.jax_json.read_text()), json.loads(args.hf_json.read_text()), args.batch_tokens)
    else:
        figures = run(args) if args.command == "run" else default_task(args)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
