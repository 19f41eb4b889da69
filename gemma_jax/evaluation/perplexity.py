"""Perplexity and bits per byte of texts and files, scored in rolling windows.

What is counted (the definitions `gemma-jax score` reports):
- a text is encoded as HF does (BOS first, no EOS); every token after BOS is scored exactly once,
  with the context rolling_pairs gives it (window and stride, see scoring.rolling_pairs);
- nll: the sum of -log P(token | context) in nats over those tokens;
- perplexity = exp(nll / tokens); bits_per_byte = nll / (ln 2 * bytes), bytes being the UTF-8
  bytes of the text (for a file: its size; files are read as UTF-8 without newline translation).
  Bits per byte compares models with different tokenizers; perplexity does not.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

from gemma_jax.errors import EvaluationError
from gemma_jax.evaluation import scoring


@dataclasses.dataclass(frozen=True)
class TextScore:
    name: str
    tokens: int       # tokens scored (all but BOS)
    bytes: int        # UTF-8 bytes of the text
    nll: float        # nats, summed over the scored tokens
    windows: int      # forwards (rolling windows) the text took

    @property
    def nats_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes)

    def to_json(self) -> dict:
        return {"name": self.name, "tokens": self.tokens, "bytes": self.bytes, "windows": self.windows,
                "nll": self.nll, "nats_per_token": self.nats_per_token, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}


def total(scores: Sequence[TextScore], name: str = "total") -> TextScore:
    """All texts as one corpus: token-weighted perplexity, byte-weighted bits per byte."""
    return TextScore(name, sum(s.tokens for s in scores), sum(s.bytes for s in scores),
                     sum(s.nll for s in scores), sum(s.windows for s in scores))


def score_texts(model, texts: Sequence[str], names: Sequence[str] | None = None, window: int | None = None,
                stride: int | None = None, hooks: Mapping[str, Callable] | None = None,
                batching: scoring.Batching = scoring.Batching(),
                progress: Callable[[int], None] | None = None) -> list[TextScore]:
    """A TextScore per text; `progress(n)` as windows are scored (count_windows gives the total)."""
    tok = model._need_tokenizer()
    names = [f"text {i}" for i in range(len(texts))] if names is None else list(names)
    sequences = []
    for name, text in zip(names, texts, strict=True):
        ids = tok.encode(text)
        if len(ids) < 2:
            raise EvaluationError(f"{name}: no token to score (the text is empty)")
        sequences.append(ids)
    window, stride = scoring.check_window(model, window, stride)
    logprobs = scoring.token_logprobs(model, sequences, window, stride, hooks, batching, progress)
    return [TextScore(name, len(lp), len(text.encode("utf-8")), float(-lp.astype("float64").sum()),
                      len(scoring.rolling_pairs(ids, window, stride)))
            for name, text, ids, lp in zip(names, texts, sequences, logprobs)]


def count_windows(model, texts: Sequence[str], window: int | None = None, stride: int | None = None) -> int:
    """How many windows score_texts will run (for a progress bar)."""
    window, stride = scoring.check_window(model, window, stride)
    tok = model._need_tokenizer()
    return sum(len(scoring.rolling_pairs(tok.encode(t), window, stride)) for t in texts)


def read_text(path: str | Path) -> str:
    """A file's text (UTF-8, newlines untranslated); a clear error when it cannot be scored."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvaluationError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text:
        raise EvaluationError(f"{path}: empty file, nothing to score")
    return text


def score_files(model, paths: Sequence[str | Path], window: int | None = None, stride: int | None = None,
                batching: scoring.Batching = scoring.Batching(), progress: bool = False) -> dict:
    """`gemma-jax score`: every file and their total, as a JSON-ready dict (a progress bar on
    stderr over the windows when progress is true)."""
    texts = [read_text(p) for p in paths]
    window, stride = scoring.check_window(model, window, stride)
    bar = None
    if progress:
        import sys

        from tqdm import tqdm
        bar = tqdm(total=count_windows(model, texts, window, stride), desc="scoring", unit="window", file=sys.stderr)
    try:
        scores = score_texts(model, texts, [str(p) for p in paths], window, stride, None, batching,
                             None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    return {"window": window, "stride": stride, "files": [s.to_json() for s in scores],
            "total": total(scores).to_json()}
