"""Evaluation: scoring against a direct forward, perplexity against a hand computation, and the
lm-eval backend against lm-eval's own HF backend (HFLM) on the same tiny random HF Gemma 2 with the
real Gemma 2 vocabulary: the same log-likelihoods, is_greedy, rolling log-likelihoods, greedy
generations and task accuracy. Steered evaluation: an SAE splice with the error term changes
nothing, a real edit does."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import gemma_jax
from gemma_jax import cli
from gemma_jax.evaluation import perplexity, scoring, steering
from hf_oracle import hf_logits, hf_model, save

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from gemma_jax.evaluation.harness import GemmaLM, evaluate  # noqa: E402

TOKENIZER_DIR = Path(os.environ.get("GEMMA_JAX_TOKENIZER_DIR") or "/nonexistent")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
CONTEXT = 64     # max_position_embeddings of the tiny model: HFLM's max_length, rolling windows split at it
LL_TOLERANCE = 1e-4


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


class Env:
    """Made once per module: the HF model on disk with the real tokenizer files, its conversion,
    gemma_jax's model and lm-eval backend, and HFLM over the HF directory."""

    def __init__(self, root: Path):
        from lm_eval.models.huggingface import HFLM
        self.root = root
        # embeddings of std 0.3: log-probabilities near -ln V, where float32 sums of a few tokens
        # agree to 1e-4 (HF's own float32 error, measured against float64, is most of the gap)
        self.torch_model = hf_model(vocab_size=256000, max_position_embeddings=CONTEXT, embed_std=0.3)
        self.hf_dir = save(self.torch_model, root / "hf")
        for name in TOKENIZER_FILES:
            shutil.copy(TOKENIZER_DIR / name, self.hf_dir / name)
        self.ckpt = gemma_jax.convert(self.hf_dir, root / "ckpt")
        self.model = gemma_jax.load(self.ckpt, dtype="float32")
        self.ours = GemmaLM(self.model)
        self.hflm = HFLM(pretrained=str(self.hf_dir), device="cpu", dtype="float32", batch_size=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if not all((TOKENIZER_DIR / name).is_file() for name in TOKENIZER_FILES):
        pytest.skip("needs GEMMA_JAX_TOKENIZER_DIR (the real Gemma 2 tokenizer files)")
    return Env(tmp_path_factory.mktemp("eval"))


def _direct(model, ids, first: int = 0, length: int = CONTEXT) -> tuple[np.ndarray, np.ndarray]:
    """(log P(ids[t + 1] | ids[:t + 1]), whether ids[t + 1] is the argmax) for t >= first, from one
    plain forward of ids[:-1] (float64 log-softmax), right-padded to `length` with a mask so that
    every call is one compiled program."""
    fed = ids[:-1]
    padded = np.zeros((1, length), np.int64)
    padded[0, :len(fed)] = fed
    mask = (np.arange(length) < len(fed))[None].astype(np.int64)
    rows = _log_softmax(model.logits(padded, mask)[0, first:len(fed)])
    targets = np.asarray(ids[first + 1:])
    return rows[np.arange(len(rows)), targets], rows.argmax(-1) == targets


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


# ------------------------------------------------------------------------------- tokenization
STRINGS = ["Hello world", "  leading and trailing  ", "日本の首都は東京です。", "tabs\tand\nnewlines\n\n",
           "<bos>already has BOS", "a literal <eos> inside and <start_of_turn>user", "", "1234567 + 89"]


def test_tokenization_is_hflm_s(env):
    for s in STRINGS:
        assert env.ours.tok_encode(s) == env.hflm.tok_encode(s), s
        assert env.ours.tok_encode(s, add_special_tokens=False) == env.hflm.tok_encode(s, add_special_tokens=False)
    assert env.ours.max_length == env.hflm.max_length == CONTEXT
    assert (env.ours.prefix_token_id, env.ours.eot_token_id) == (env.hflm.prefix_token_id, env.hflm.eot_token_id)
    # the library's own pair encoding (Gemma.loglikelihood) is TemplateLM's
    tok = env.model.tokenizer
    for context, continuation in [("The cat sat on the ", "mat"), ("Q: 2+2?\nA:", " 4"), ("", "hello"),
                                  ("x", "yz"), ("trailing\n\n", "next")]:
        theirs = env.ours._encode_pair(context, continuation) if context else None
        ours = scoring.encode_pair(tok.encode, context, continuation, tok.bos_id)
        assert ours == (theirs if context else ([tok.bos_id], tok.encode(continuation, add_bos=False)))


def test_rolling_windows(env):
    text = "The quick brown fox jumps over the lazy dog. " * 15
    tokens = env.hflm.tok_encode(text)
    assert len(tokens) > 2 * CONTEXT and tokens[0] == env.ours.prefix_token_id
    theirs = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        token_list=tokens, prefix_token=env.hflm.prefix_token_id, max_seq_len=env.hflm.max_length, context_len=1)]
    assert env.ours.rolling_windows(text) == theirs
    assert theirs[0][0] == [tokens[0]] and theirs[0][1][0] == tokens[0]   # log P(BOS | BOS) is scored
    plain = GemmaLM(env.model, rolling="plain")
    body = env.model.tokenizer.encode(text, add_bos=False)
    assert plain.rolling_windows(text) == scoring.rolling_pairs([tokens[0]] + body, CONTEXT, CONTEXT)


# ------------------------------------------------------------------------- against HFLM
CONTEXTS = ["The cat sat on the ", "Question: what is 2+2?\nAnswer:", "", "日本の首都は", "def f(x):\n    return",
            "word " * 70]
CONTINUATIONS = [" mat", "mat", " 4", " four", "hello world", "東京です。", " x * 2\n"]


def test_loglikelihood_matches_hflm(env, report):
    args = [(c, k) for c in CONTEXTS for k in CONTINUATIONS]
    # greedy continuations (HF's own greedy text) make some is_greedy true
    greedy = env.hflm.generate_until(_requests("generate_until", [(c, {"until": [], "max_gen_toks": n})
                                                                  for c, n in (("Hello", 1), ("The answer is", 2))]),
                                     disable_tqdm=True)
    args += [("Hello", greedy[0]), ("The answer is", greedy[1])]
    requests = _requests("loglikelihood", args)
    theirs = env.hflm.loglikelihood(requests, disable_tqdm=True)
    ours = env.ours.loglikelihood(requests, disable_tqdm=True)
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    report("eval: max |loglikelihood - HFLM| (tiny model, 44 requests)", diff)
    assert diff <= LL_TOLERANCE
    assert [a[1] for a in ours] == [b[1] for b in theirs]
    assert any(a[1] for a in ours) and not all(a[1] for a in ours)
    # the library call (its own pair encoding) gives the same numbers
    lib = env.model.loglikelihood([c for c, _ in args], [k for _, k in args])
    assert max(abs(a[0] - b[0]) for a, b in zip(lib, ours)) <= 1e-4
    assert [a[1] for a in lib] == [a[1] for a in ours]


def test_rolling_matches_hflm(env, report):
    texts = ["", "hello", "The quick brown fox jumps over the lazy dog. " * 12, "def f(x):\n    return x * 2\n" * 9,
             "東京は日本の首都です。" * 10]
    requests = _requests("loglikelihood_rolling", [(t,) for t in texts])
    theirs = env.hflm.loglikelihood_rolling(requests, disable_tqdm=True)
    ours = env.ours.loglikelihood_rolling(requests, disable_tqdm=True)
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(ours, theirs))
    report("eval: max relative |rolling loglikelihood - HFLM|", worst)
    assert worst <= 2e-6


def test_generate_until_matches_hflm(env):
    contexts = ["Hello there", "word " * 70, "def main():"]
    free = env.hflm.generate_until(_requests("generate_until", [(c, {"until": [], "max_gen_toks": 12})
                                                                for c in contexts]), disable_tqdm=True)
    args = []
    for context, text in zip(contexts, free):
        middle = text[len(text) // 3: len(text) // 3 + 3]          # a stop string the generation reaches
        args += [(context, {"until": [middle], "max_gen_toks": 12}),
                 (context, {"until": ["\n", middle[:2]], "max_gen_toks": 6, "do_sample": False}),
                 (context, {"max_gen_toks": 5})]
    requests = _requests("generate_until", args)
    theirs = env.hflm.generate_until(requests, disable_tqdm=True)
    ours = env.ours.generate_until(requests, disable_tqdm=True)
    assert ours == theirs
    assert sum(len(a) < len(free[i // 3]) for i, a in enumerate(ours)) >= len(contexts)   # stops did stop


def _local_task(directory: Path, n: int = 24) -> str:
    """A multiple-choice task over a local JSONL (absolute data_files: lm-eval loads it offline)."""
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "sky", "table", "river", "green", "seven", "quickly", "house", "music", "paper", "moon"]
    with open(directory / "mc.jsonl", "w") as f:
        for i in range(n):
            choices = [" " + " ".join(rng.choice(words, size=rng.integers(1, 4))) for _ in range(4)]
            f.write(json.dumps({"question": f"Item {i}: the {words[i % len(words)]} is", "choices": choices,
                                "label": int(rng.integers(4))}) + "\n")
    (directory / "local_mc.yaml").write_text(f"""task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'mc.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return "local_mc"


def test_simple_evaluate_matches_hflm_and_cli(env, tmp_path, capsys):
    task = _local_task(tmp_path)
    kwargs = dict(include_path=tmp_path, log_samples=True, bootstrap_iters=0)
    ours = evaluate(env.ours, [task], **kwargs)
    theirs = evaluate(env.hflm, [task], **kwargs)
    assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]
    assert ours["results"][task]["acc_norm,none"] == theirs["results"][task]["acc_norm,none"]
    ll = [[r[0][0] for r in s["resps"]] for s in ours["samples"][task]]
    ref = [[r[0][0] for r in s["resps"]] for s in theirs["samples"][task]]
    assert np.abs(np.asarray(ll) - np.asarray(ref)).max() <= LL_TOLERANCE
    # the command line: the same task through simple_evaluate, JSON written
    out = tmp_path / "results.json"
    assert cli.main(["--no-compile-cache", "eval", "--ckpt", str(env.ckpt), "--dtype", "float32", "--tasks", task,
                     "--include-path", str(tmp_path), "--output", str(out)]) == 0
    assert "local_mc" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"][task]["acc,none"] == ours["results"][task]["acc,none"]


# ------------------------------------------------------------------------------ scoring core
def test_score_equals_logits_and_rolling_by_hand(env):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, 256000, n).tolist() for n in (2, 9, 33, CONTEXT)]
    for ids, lp in zip(seqs, env.model.score(seqs)):
        np.testing.assert_allclose(lp, _direct(env.model, ids)[0], atol=2e-5)
    text = "Perplexity, one token after another. " * 3
    ids = env.model.tokenizer.encode(text)
    np.testing.assert_allclose(env.model.score(text), _direct(env.model, ids)[0], atol=2e-5)
    # a sequence longer than the model's context, by hand: window w feeds ids[end - W:end] and
    # scores the targets it is the first to reach
    long = rng.integers(3, 256000, 3 * CONTEXT + 7).tolist()
    for window, stride in ((CONTEXT, CONTEXT), (40, 19)):
        expected, done = np.zeros(len(long) - 1), 0
        while done < len(long) - 1:
            end = min(window if done == 0 else done + stride, len(long) - 1)
            start = max(0, end - window)
            # targets done+1..end are predicted from fed positions done..end-1 of ids[start:end + 1]
            expected[done:end] = _direct(env.model, long[start:end + 1], first=done - start)[0]
            done = end
        np.testing.assert_allclose(env.model.score(long, window=window, stride=stride), expected, atol=2e-5)


def test_bounded_compilation_and_batch_independence(env, report):
    rng = np.random.default_rng(2)
    corpus = [(rng.integers(3, 256000, rng.integers(1, 30)).tolist(), rng.integers(3, 256000, rng.integers(1, 16)).tolist())
              for _ in range(60)]
    corpus += [(corpus[i][0], rng.integers(3, 256000, rng.integers(1, 9)).tolist()) for i in range(0, 60, 3)]  # shared
    batching = scoring.Batching(max_tokens=512, max_rows=16)
    before = scoring.compiled_programs()
    batched = scoring.score_pairs(env.model, corpus, batching=batching)
    first = scoring.compiled_programs() - before
    again = [(c[:-1] or c, k) for c, k in corpus[::-1]]          # other lengths, same range
    scoring.score_pairs(env.model, again, batching=batching)
    second = scoring.compiled_programs() - before - first
    report("eval: programs compiled for 80 requests feeding 1-43 tokens (then for 80 more)", f"{first} (+{second})")
    # length buckets 16/32/64, scored-position buckets, batch sizes: bounded by their product
    assert first <= 16 and second <= 2
    for (context, continuation), got in list(zip(corpus, batched))[::7]:   # some shared, some not
        lp, greedy = _direct(env.model, context + continuation, first=len(context) - 1)
        np.testing.assert_allclose(got.logprobs, lp, atol=2e-5)
        assert (got.greedy == greedy).all()


# ------------------------------------------------------------------------------ steering
class TinySAE:
    """Any object with encode/decode will do (the backend knows no SAE class)."""

    def __init__(self, d: int, width: int, seed: int = 0):
        from gemma_jax.sae import JumpReLUSAE
        rng = np.random.default_rng(seed)
        self.inner = JumpReLUSAE(W_enc=rng.standard_normal((d, width), np.float32) / np.sqrt(d),
                                 W_dec=rng.standard_normal((width, d), np.float32) / np.sqrt(width),
                                 b_enc=np.zeros(width, np.float32), b_dec=np.zeros(d, np.float32),
                                 threshold=np.full(width, 0.1, np.float32))

    def encode(self, x):
        return self.inner.encode(x)

    def decode(self, f):
        return self.inner.decode(f)


def test_steered_evaluation(env):
    site = "blocks.1.hook_resid_post"
    sae = TinySAE(env.model.config.hidden_size, 64)
    args = [(c, k) for c in CONTEXTS[:2] for k in CONTINUATIONS[:3]]    # shared contexts: two programs
    requests = _requests("loglikelihood", args)
    plain = env.ours.loglikelihood(requests, disable_tqdm=True)
    spliced = GemmaLM(env.model, sae=sae, sae_site=site).loglikelihood(requests, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(plain, spliced)) <= 1e-3
    assert [a[1] for a in plain] == [a[1] for a in spliced]
    steer = steering.add_to_features({3: 8.0, 10: -8.0}, 64)
    steered = GemmaLM(env.model, sae=sae, sae_site=site, sae_edit=steer).loglikelihood(requests, disable_tqdm=True)
    reconstructed = GemmaLM(env.model, sae=sae, sae_site=site, use_error_term=False).loglikelihood(
        requests, disable_tqdm=True)
    for edited in (steered, reconstructed):
        assert max(abs(a[0] - b[0]) for a, b in zip(plain, edited)) > 0.1
    # the steering edit adds 8 * W_dec[3] - 8 * W_dec[10] at the site: the same as a plain hook
    vector = 8.0 * (sae.inner.W_dec[3] - sae.inner.W_dec[10])
    hooked = GemmaLM(env.model, hooks={site: lambda x: x + vector}).loglikelihood(requests, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(steered, hooked)) <= 1e-3


# ---------------------------------------------------------------------- the default model
def _held_out_file(min_tokens: int, tokenizer) -> Path:
    """The smallest standard-library file that scripts/train_tiny.py held out of the default model's
    training (is_held_out: sha256 of the file name < 13) with at least min_tokens tokens."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
    files = sorted((f for f in stdlib.rglob("*.py") if not skip & set(f.relative_to(stdlib).parts)
                    and hashlib.sha256(f.name.encode()).digest()[0] < 13), key=lambda f: f.stat().st_size)
    for f in files:
        if len(tokenizer.encode(f.read_text(encoding="utf-8"))) >= min_tokens:
            return f
    pytest.skip("no held-out standard-library file long enough here")


def test_default_model_perplexity_by_hand(tmp_path, monkeypatch, capsys, report):
    from gemma_jax import default
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = gemma_jax.load(default.checkpoint_dir(), dtype="float32")
    window = model.config.max_position_embeddings
    path = _held_out_file(window + window // 2 + 10, model.tokenizer)
    assert cli.main(["--no-compile-cache", "score", str(path)]) == 0
    figures = json.loads(capsys.readouterr().out)
    got = figures["files"][0]
    # by hand: windows of 1024 tokens, 512 new targets each after the first, log-softmax in float64
    text = path.read_text(encoding="utf-8")
    ids = model.tokenizer.encode(text)
    nll, done, windows = 0.0, 0, 0
    while done < len(ids) - 1:
        end = min(window if done == 0 else done + window // 2, len(ids) - 1)
        start = max(0, end - window)
        nll -= _direct(model, ids[start:end + 1], first=done - start, length=window)[0].sum()
        done, windows = end, windows + 1
    assert windows >= 3 and got["windows"] == windows
    assert got["tokens"] == len(ids) - 1 and got["bytes"] == path.stat().st_size
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)
    assert figures["total"]["nll"] == got["nll"] and (figures["window"], figures["stride"]) == (window, window // 2)
    report(f"eval: default model on held-out {path.name}", f"perplexity {got['perplexity']:.2f}, "
           f"{got['bits_per_byte']:.3f} bits/byte, {got['nats_per_token']:.2f} nats/token")
    assert got["nats_per_token"] < 0.5 * math.log(model.config.vocab_size)     # it has learned
    scores = perplexity.score_texts(model, [text, text[:300]], window=256, stride=256)
    assert scores[0].nll > scores[1].nll > 0
