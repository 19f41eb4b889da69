"""A backend for EleutherAI's lm-evaluation-harness: `GemmaLM`, registered as model "gemma_jax".

Importing this module registers it (lm-eval 0.4.13 reads no entry points for models):

    import gemma_jax.evaluation.harness                       # then lm-eval knows "gemma_jax"
    lm_eval.simple_evaluate(model="gemma_jax", model_args="pretrained=CKPT", tasks=[...])
    python -m gemma_jax.evaluation run --model gemma_jax --model_args pretrained=CKPT --tasks ...
    gemma-jax eval --ckpt CKPT --tasks ...                    # the same, through simple_evaluate

It scores what lm-eval's HF backend (HFLM 0.4.13) scores on the same weights:
- tokenization: lm-eval's own TemplateLM.loglikelihood (trailing spaces of the context move to
  the continuation; the continuation is cut from encode(context + continuation)); BOS added as HF
  adds it, a text that starts with "<bos>" not given another; literal control tokens in the text
  become their ids as HF's tokenizer makes them;
- max_length = max_position_embeddings (what HFLM reads from the config), and HFLM's left
  truncation of long requests;
- loglikelihood_rolling: lm-eval's own rolling windows over tok_encode(text), which holds BOS, with
  BOS as the prefix token: the first window is [BOS, BOS, tokens...] and log P(BOS | BOS) is counted,
  as HFLM 0.4.13 does (rolling="hflm", the default, so numbers compare with published ones);
  rolling="plain" scores the text's tokens after a single BOS instead;
- generate_until: greedy unless do_sample, max_gen_toks (default 256), the context left-truncated
  to max_length - max_gen_toks, stop sequences cut as HFLM cuts them, special tokens skipped in
  the decoded text.
Differences are of speed only: requests are batched by length with shared contexts read once (see
scoring). `hooks` and `sae` run the whole evaluation on an edited model (steered evaluation).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
# importing lm_eval.models (here through its utils) registers lm-eval's own models first: its
# registry imports them only while it is empty, so registering ours first would hide "hf"
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from gemma_jax.errors import EvaluationError, GemmaError, GemmaWarning
from gemma_jax.evaluation import scoring, steering

log = logging.getLogger(__name__)
NAME = "gemma_jax"
_SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p"}


def _load(pretrained, dtype):
    import gemma_jax
    from gemma_jax.api import Gemma
    if isinstance(pretrained, Gemma):
        return pretrained
    if pretrained in (None, "", "default"):
        from gemma_jax import default
        pretrained = default.checkpoint_dir()
        dtype = dtype or "float32"
    path = Path(str(pretrained)).expanduser()
    if (path / "config.json").is_file() and not (path / "gemma_config.json").is_file():
        raise EvaluationError(f"{path} is a Hugging Face directory: convert it first (gemma-jax convert {path} CKPT) "
                         "and pass pretrained=CKPT")
    return gemma_jax.load(path, dtype=dtype)


@register_model(NAME)
class GemmaLM(TemplateLM):
    """lm-eval's view of a gemma_jax model.

    pretrained: a converted checkpoint directory, a loaded `Gemma`, or None for the built-in
    default model. batch_size (lm-eval's; "auto" or None = 64) bounds the rows of one forward,
    batch_tokens the padded tokens of one forward. hooks ({site or pattern: fn}) and sae (any
    object with encode/decode, spliced at sae_site; with use_error_term the splice alone changes
    nothing, `sae_edit(features) -> features` is the edit) run the evaluation on an edited model.
    """

    def __init__(self, pretrained=None, dtype: str | None = None, max_length: int | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None, device: str | None = None,
                 batch_tokens: int = scoring.Batching.max_tokens, share_prefix: bool = True,
                 rolling: str = "hflm", max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, seed: int = 0,
                 hooks: Mapping[str, Callable] | None = None, sae=None, sae_site: str | None = None,
                 sae_edit: Callable | None = None, use_error_term: bool = True, **unknown):
        super().__init__()
        if unknown:
            raise EvaluationError(f"gemma_jax model: unknown argument(s) {sorted(unknown)} (see GemmaLM's docstring)")
        if rolling not in ("hflm", "plain"):
            raise EvaluationError(f"gemma_jax model: rolling must be 'hflm' or 'plain', got {rolling!r}")
        self.gemma = _load(pretrained, None if dtype == "auto" else dtype)
        self._tok = self.gemma._need_tokenizer()
        limit = self.gemma.config.max_position_embeddings
        if max_length is not None and not (isinstance(max_length, int) and 1 <= max_length <= limit):
            raise EvaluationError(f"gemma_jax model: max_length must be an integer in [1, {limit}], got {max_length!r}")
        self._max_length = max_length or limit
        if isinstance(batch_size, str) and batch_size.isdigit():
            batch_size = int(batch_size)
        rows = batch_size if isinstance(batch_size, int) and not isinstance(batch_size, bool) else scoring.Batching.max_rows
        if isinstance(max_batch_size, int) and not isinstance(max_batch_size, bool):
            rows = min(rows, max_batch_size)
        self.batching = scoring.Batching(max_tokens=batch_tokens, max_rows=rows, share_prefix=bool(share_prefix))
        self.rolling = rolling
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.seed = seed
        self.hooks = steering.with_sae(self.gemma.config, hooks, sae, sae_site, use_error_term, sae_edit)
        specials = {"<pad>": self._tok.pad_id, "<eos>": self._tok.eos_id, "<bos>": self._tok.bos_id,
                    "<unk>": self._tok._sp.unk_id()}
        self._control = {text: i for text, i in specials.items() if i >= 0}
        self._control_split = re.compile("(" + "|".join(map(re.escape, self._control)) + ")")
        # what HF's tokenizer.decode(skip_special_tokens=True) drops for Gemma: control ids, <unk>
        # and the chat markers
        self._skip = set(self._control.values())
        for marker in ("<start_of_turn>", "<end_of_turn>"):
            try:
                self._skip.add(self._tok.token_id(marker))
            except GemmaError:
                pass
        if device not in (None, "cpu", "cuda", "auto"):
            log.info("gemma_jax ignores device=%s: JAX places the model on its default device", device)

    # ------------------------------------------------------------------------ lm-eval properties
    @property
    def eot_token_id(self) -> int:
        return self._tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.custom_prefix_token_id if self.custom_prefix_token_id is not None else self._tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return "gemma_jax__" + str(self._tok.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "gemma2" if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        from gemma_jax.tokenizer import render_chat
        return render_chat(chat_history, add_generation_prompt)

    def get_model_info(self) -> dict:
        import jax
        return {"model_num_parameters": int(sum(x.size for x in jax.tree.leaves(self.gemma.state))),
                "model_dtype": str(np.dtype(self.gemma.dtype)), "model_backend": NAME}

    # ---------------------------------------------------------------------------- tokenization
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """HFLM.tok_encode: BOS unless told otherwise or the text already starts with "<bos>"."""
        add = add_special_tokens if add_special_tokens is not None else \
            (self.add_bos_token if self.add_bos_token is not None else True)
        if add_special_tokens is None and string.startswith(self._tok.id_to_piece(self.prefix_token_id)):
            add = False
        ids = [self._tok.bos_id] if add else []
        for part in self._control_split.split(string) if "<" in string else [string]:
            if part in self._control:
                ids.append(self._control[part])
            elif part:
                ids += self._tok.encode(part, add_bos=False)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        tokens = [tokens] if isinstance(tokens, (int, np.integer)) else list(tokens)
        if not skip_special_tokens:
            return "".join(self._tok.id_to_piece(t) if t in self._skip else self._tok.decode([t]) for t in tokens)
        return self._tok.decode([t for t in tokens if t not in self._skip])

    # --------------------------------------------------------------------------------- scoring
    def _score(self, pairs, disable_tqdm: bool, desc: str) -> list[scoring.Scored]:
        with tqdm(total=len(pairs), disable=disable_tqdm, desc=desc) as bar:
            return scoring.score_pairs(self.gemma, pairs, self.hooks, self.batching, bar.update)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [scoring.truncate_pair(context, continuation, self.max_length) for _, context, continuation in requests]
        cut = sum(len(p[0]) < len(r[1]) for p, r in zip(pairs, requests))
        if cut:
            log.warning("%d requests longer than max_length %d were truncated from the left", cut, self.max_length)
        out = []
        for (request, _, _), result in zip(requests, self._score(pairs, disable_tqdm, "gemma_jax loglikelihood")):
            answer = (float(np.sum(result.logprobs, dtype=np.float64)), bool(result.greedy.all()))
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
            out.append(answer)
        return out

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """lm-eval's (context, continuation) windows for one text, as HFLM makes them."""
        tokens = self.tok_encode(text) if self.rolling == "hflm" else self.tok_encode(text, add_special_tokens=False)
        return [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for r, request in enumerate(requests):
            for window in self.rolling_windows(request.args[0]):
                pairs.append(window)
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, result in zip(owner, self._score(pairs, disable_tqdm, "gemma_jax loglikelihood_rolling")):
            totals[r] += float(np.sum(result.logprobs, dtype=np.float64))
        for request, value in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), value)
        return totals

    # ------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="gemma_jax generate_until") as bar:
            for idxs in groups.values():
                self._generate_group(requests, idxs, out, bar)
        return out

    def _generate_group(self, requests, idxs, out, bar) -> None:
        gen_kwargs = requests[idxs[0]].args[1]
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode(self.eot_token_id, False))
        max_gen = kwargs.pop("max_gen_toks")
        unknown = set(kwargs) - _SAMPLING_KEYS
        if unknown:
            raise EvaluationError(f"gemma_jax: generation argument(s) {sorted(unknown)} are not supported "
                                  f"(supported: until, max_gen_toks, {', '.join(sorted(_SAMPLING_KEYS))})")
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0)) > 0
        sampling = dict(temperature=float(kwargs["temperature"]) if sample else 0.0,
                        top_k=kwargs.get("top_k") if sample else None, top_p=kwargs.get("top_p") if sample else None)
        room = self.max_length - max_gen
        if room <= 0:
            raise EvaluationError(f"max_gen_toks {max_gen} leaves no room for a context in max_length {self.max_length}")
        prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=room) for i in idxs}
        order = sorted(idxs, key=lambda i: (-len(prompts[i]), i))
        stops = [s for s in until if s]
        for start in range(0, len(order), self.batching.max_rows):
            rows = order[start:start + self.batching.max_rows]
            seen: list[list[int]] = [[] for _ in rows]

            def stop_rows(new_per_row):
                done = []
                for r, new in enumerate(new_per_row):
                    seen[r].extend(new)
                    if new and any(s in self.tok_decode(seen[r]) for s in stops):
                        done.append(r)
                return done

            real_stops = [s for s in stops if s != self.tok_decode(self.eot_token_id, False)]
            ids = self.gemma.generate_ids([prompts[i] for i in rows], max_gen, seed=self.seed, hooks=self.hooks,
                                          stream=stop_rows if real_stops else None, **sampling)
            for i, row in zip(rows, ids):
                text = postprocess_generated_text(self.tok_decode(row), until, None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(1)


# ---------------------------------------------------------------------------------- running tasks
def task_manager(include_path: str | Path | None = None, tasks=()):
    """lm-eval's TaskManager: with include_path, only that directory when it holds every task asked
    for (indexing lm-eval's 14,000 built-in tasks takes most of a minute), else both."""
    from lm_eval.tasks import TaskManager
    if include_path is not None:
        include_path = str(Path(include_path).expanduser().resolve())
        if not Path(include_path).is_dir():
            raise EvaluationError(f"{include_path}: no such task directory")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def evaluate(lm: GemmaLM, tasks: list[str], limit: int | float | None = None, num_fewshot: int | None = None,
             include_path: str | Path | None = None, log_samples: bool = False, **kwargs) -> dict:
    """lm-eval's simple_evaluate on a GemmaLM: results as lm-eval returns them."""
    from lm_eval.evaluator import simple_evaluate
    manager = task_manager(include_path, tasks)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        raise EvaluationError(f"unknown task(s) {missing}" + ("" if include_path else " (local tasks need --include-path DIR)"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GemmaWarning)
        return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                               task_manager=manager, log_samples=log_samples, **kwargs)


def report(results: dict) -> str:
    """lm-eval's results table."""
    from lm_eval.utils import make_table
    return make_table(results)


def json_results(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable
    keep = {k: v for k, v in results.items() if k != "samples"}
    return json.dumps(keep, indent=2, default=handle_non_serializable, ensure_ascii=False)





def run_eval(model, tasks: str, limit: float | None = None, num_fewshot: int | None = None,
             include_path: Path | None = None, batch_tokens: int = scoring.Batching.max_tokens,
             sae_path: Path | None = None, sae_site: str | None = None, sae_steer: tuple[str, ...] = (),
             sae_reconstruct: bool = False, output: Path | None = None) -> str:
    """`gemma-jax eval`: tasks (comma-separated) on a loaded model, optionally with a Gemma Scope SAE
    spliced in (steered by --sae-steer FEATURE=SCALE, or on its reconstruction); returns lm-eval's
    table and writes the results as JSON to `output`."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise EvaluationError("--tasks needs at least one task name")
    if limit is not None and limit == int(limit):
        limit = int(limit)
    sae = edit = None
    if sae_path is not None:
        from gemma_jax.sae import JumpReLUSAE
        sae = JumpReLUSAE.load(sae_path)
        adds = steering.parse_steer(sae_steer)
        edit = steering.add_to_features(adds, sae.W_dec.shape[0]) if adds else None
    elif sae_site or sae_steer or sae_reconstruct:
        raise EvaluationError("--sae-site, --sae-steer and --sae-reconstruct need --sae PATH")
    lm = GemmaLM(model, batch_tokens=batch_tokens, sae=sae, sae_site=sae_site, sae_edit=edit,
                 use_error_term=not sae_reconstruct)
    results = evaluate(lm, names, limit=limit, num_fewshot=num_fewshot, include_path=include_path)
    if output is not None:
        Path(output).write_text(json_results(results) + "\n")
    return report(results)
