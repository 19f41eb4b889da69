"""The public entry point: `load` a converted checkpoint and run it."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax import cache as kv
from gemma_jax import checkpoint, checks, quant, sampler
from gemma_jax import hooks as hooks_lib
from gemma_jax.config import GemmaConfig
from gemma_jax.errors import EvaluationError, GenerationError, TokenizerError
from gemma_jax.attention import AttentionConfig, attention_config
from gemma_jax.evaluation import scoring
from gemma_jax.model import Transformer, abstract_model, set_attention, weight_in_axis

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """[B, T] 0/1 mask -> positions counting real tokens from 0, -1 at padding (any side)."""
    mask = np.asarray(mask).astype(bool)
    return np.where(mask, np.cumsum(mask, axis=1) - 1, -1).astype(np.int32)


_forward_logits = jax.jit(hooks_lib.forward, static_argnums=(0, 4))


@functools.lru_cache(maxsize=16)
def _sharded_init_cache(config: GemmaConfig, mesh: jax.sharding.Mesh, batch: int, max_length: int, dtype):
    """A jitted maker of an empty cache laid out over mesh: one compilation per shape, reused."""
    from gemma_jax.sharding import cache_sharding
    layer = cache_sharding(config, mesh, batch)
    out = kv.KVCache(tuple(kv.LayerKV(layer, layer) for _ in range(config.num_hidden_layers)),
                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return jax.jit(lambda: kv.init_cache(config, batch, max_length, dtype), out_shardings=out)


class Gemma:
    """A loaded model: config, parameters (an nnx State), compute dtype and optional tokenizer."""

    def __init__(self, model: Transformer, tokenizer=None, mesh: jax.sharding.Mesh | None = None):
        self.config: GemmaConfig = model.config
        self.dtype = model.dtype
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = tokenizer
        self.mesh = mesh
        self._forward = _forward_logits if mesh is None else jax.jit(
            hooks_lib.forward, static_argnums=(0, 4),
            out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def new_cache(self, batch: int, max_length: int) -> kv.KVCache:
        """An empty KV cache, laid out over the mesh when there is one."""
        if self.mesh is None:
            return kv.init_cache(self.config, batch, max_length, self.dtype)
        return _sharded_init_cache(self.config, self.mesh, batch, max_length, self.dtype)()

    @property
    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.state)

    @property
    def attention(self) -> AttentionConfig:
        return self.model.blocks[0].attn.attention

    def with_attention(self, attention: str | AttentionConfig) -> Gemma:
        """The same weights (shared, not copied) computing attention another way: 'auto', 'xla',
        'blockwise', 'splash' or an AttentionConfig (see gemma_jax.attention)."""
        model = self.model
        set_attention(model, attention_config(attention))
        return Gemma(model, self.tokenizer, self.mesh)

    def check_tokens(self, tokens: np.ndarray) -> None:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            bad = int(tokens.min() if tokens.min() < 0 else tokens.max())
            raise GenerationError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def _prepare(self, token_ids, attention_mask=None) -> tuple[jax.Array, jax.Array]:
        """Checked int [B, T] ids and optional 0/1 mask -> (ids with padding replaced, positions)."""
        tokens = _array(token_ids, "token_ids")
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise GenerationError(f"token_ids must be a non-empty [batch, length] array, got shape {list(tokens.shape)}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise GenerationError(f"token_ids must be integers, got {tokens.dtype}")
        mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != tokens.shape:
            raise GenerationError(f"attention_mask shape {list(mask.shape)} != token_ids shape {list(tokens.shape)}")
        self.check_tokens(tokens[mask.astype(bool)])
        if tokens.shape[1] > self.config.max_position_embeddings:
            raise GenerationError(f"sequence length {tokens.shape[1]} exceeds max_position_embeddings "
                                  f"{self.config.max_position_embeddings}")
        tokens = np.where(mask.astype(bool), tokens, self.config.pad_token_id).astype(np.int32)
        return jnp.asarray(tokens), jnp.asarray(positions_from_mask(mask))

    def logits(self, token_ids, attention_mask=None, check_finite: bool = False) -> np.ndarray:
        """int [B, T] ids (and optional 0/1 mask for padding) -> float32 logits [B, T, V].

        check_finite: if the logits hold NaN or inf, raise GenerationError naming the first hook
        site (layer) where a non-finite value appears.
        """
        tokens, positions = self._prepare(token_ids, attention_mask)
        out = np.asarray(self._forward(self.graphdef, self.state, tokens, positions), dtype=np.float32)
        if check_finite and not np.isfinite(out).all():
            flags = jax.device_get(hooks_lib.finite_by_site(self.graphdef, self.state, tokens, positions))
            first = next((n for n in hooks_lib.site_names(self.config) if not flags[n]), "hook_logits")
            raise GenerationError(f"non-finite values (NaN/inf) first appear at {first}")
        return out

    # ------------------------------------------------------------------------------ research
    def run_with_cache(self, tokens, names=None, stop_at_layer: int | None = None, incl_grad=None,
                       attention_mask=None, remove_batch_dim: bool = False, names_filter=None):
        """(logits [B, T, V], ActivationCache) in one compiled call, TransformerLens style.

        tokens: text (BOS added), ids [T] or [B, T]. names (or TransformerLens's names_filter): sites,
        aliases, glob patterns or a predicate; None = every site. stop_at_layer=L: only layers < L
        run (a smaller program) and the first output is the residual entering layer L.
        incl_grad=fn: the cache also holds '{site}_grad', the gradient of the scalar fn(logits) at
        each cached site (TransformerLens's incl_bwd). See docs/interpretability.md."""
        from gemma_jax import interp
        if names is not None and names_filter is not None:
            raise GenerationError("pass names or names_filter, not both")
        out, cache = interp.run(self, tokens, names if names_filter is None else names_filter,
                                stop_at_layer=stop_at_layer, incl_grad=incl_grad, attention_mask=attention_mask)
        return out, cache.remove_batch_dim() if remove_batch_dim else cache

    def run_with_hooks(self, tokens, hooks=(), stop_at_layer: int | None = None, attention_mask=None):
        """Logits [B, T, V] (or the residual entering stop_at_layer) with `hooks` applied: {site or
        pattern: fn(value) -> value}, or (site, fn) pairs. Hook functions are static under jit:
        reuse the same objects to compile once."""
        from gemma_jax import interp
        out, _ = interp.run(self, tokens, (), hooks, stop_at_layer=stop_at_layer, attention_mask=attention_mask)
        return out

    # ------------------------------------------------------------------------------- scoring
    def score(self, texts_or_ids, hooks=None, window: int | None = None, stride: int | None = None,
              batching: scoring.Batching | None = None):
        """Per-token log-probabilities: for a sequence x (a text, encoded with BOS as HF does, or
        token ids), float32 [len(x) - 1] holding log P(x[t] | x[:t]) for t >= 1; a list for a list.

        Batched in length buckets; sequences longer than `window` (default max_position_embeddings)
        are scored in rolling windows (evaluation.scoring.rolling_pairs). `hooks` as in generate.
        """
        single = isinstance(texts_or_ids, str) or (
            len(texts_or_ids) > 0 and isinstance(texts_or_ids[0], (int, np.integer)))
        items = [texts_or_ids] if single else list(texts_or_ids)
        if not items:
            raise EvaluationError("score needs at least one text or token-id sequence")
        if all(isinstance(x, str) for x in items):
            tok = self._need_tokenizer()
            items = [tok.encode(x) for x in items]
        elif any(isinstance(x, str) for x in items):
            raise EvaluationError("score takes texts or token-id sequences, not a mix")
        out = scoring.token_logprobs(self, items, window, stride, hooks, batching or scoring.Batching())
        return out[0] if single else out

    def loglikelihood(self, context, continuation, hooks=None, batching: scoring.Batching | None = None):
        """lm-eval's loglikelihood of a continuation given a context (strings, or equal-length lists
        of them): (sum of the continuation tokens' log-probabilities, whether greedy decoding would
        produce exactly them). Tokenized as lm-eval's TemplateLM does (evaluation.scoring.encode_pair)."""
        single = isinstance(context, str)
        contexts, continuations = ([context], [continuation]) if single else (list(context), list(continuation))
        if len(contexts) != len(continuations):
            raise EvaluationError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        out = scoring.loglikelihoods(self, contexts, continuations, hooks, batching or scoring.Batching())
        return out[0] if single else out

    # ----------------------------------------------------------------------------- generation
    def generate_ids(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int = 0, stop_ids=None, return_logprobs: bool = False,
                     stream=None, hooks=None):
        """New token ids per prompt (stop token excluded); prompts is a batch: a list of token-id
        lists (one prompt is [[2, 651, 6037]]).

        stop_ids default to the config's eos ids. With return_logprobs, returns (ids, logprobs),
        the log-probabilities under the model's unmodified distribution. `stream(new_ids_per_row)`
        is called as tokens arrive (a list of new-id lists, one per row) and may return row
        indices to stop. `hooks` ({site or pattern: fn(value) -> value}, see interp) edit
        activations at every step: steered generation.
        """
        sampling = sampler.Sampling(temperature, top_k, top_p)
        max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, minimum=0)
        prompts = self._check_prompts(prompts, max_new_tokens)
        seed = checks.seed(seed)
        stop_ids = checks.token_ids("stop_ids", self.config.eos_token_ids if stop_ids is None else stop_ids,
                                    self.config.vocab_size)
        checks.callback("stream", stream)
        if max_new_tokens == 0:
            empty = [[] for _ in prompts]
            return (empty, [[] for _ in prompts]) if return_logprobs else empty
        cache_len = sampler.bucket(max(map(len, prompts)) + max_new_tokens, 32)
        cache = self.new_cache(len(prompts), cache_len)
        result, _ = sampler.run(self.graphdef, self.state, cache, prompts, [0] * len(prompts), max_new_tokens,
                                sampling, seed, stop_ids, self.config.pad_token_id, fresh=True, stream=stream,
                                hook=self._hooks(hooks))
        return (result.tokens, result.logprobs) if return_logprobs else result.tokens

    def _hooks(self, hooks) -> hooks_lib.Hooks | None:
        return hooks_lib.Hooks.from_mapping(self.config, hooks) if hooks else None

    def _check_prompts(self, prompts, max_new_tokens) -> list[list[int]]:
        max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, minimum=0)
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
            raise GenerationError("prompts must be a list of token-id lists (one per prompt)")
        if len(prompts) == 0:
            raise GenerationError("prompts is an empty batch")
        if all(isinstance(p, (int, np.integer)) for p in prompts):
            raise GenerationError("prompts must be a list of token-id lists (one per prompt), got a flat list "
                                  "of ids: write one prompt as [[2, 651, ...]]")
        out = []
        for i, p in enumerate(prompts):
            try:
                p = np.asarray(p)
            except ValueError:      # ragged nesting: not a list of ids
                p = np.zeros((0, 0))
            if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer):
                raise GenerationError(f"prompt {i} must be a non-empty list of token ids "
                                      "(an empty prompt needs at least BOS)")
            self.check_tokens(p)
            limit = self.config.max_position_embeddings
            if p.size + max_new_tokens > limit:
                which = checks.name("prompt") if len(prompts) == 1 else f"prompt {i}"
                raise GenerationError(f"{which}: {p.size} tokens + {checks.name('max_new_tokens')} "
                                      f"{max_new_tokens} exceeds the model's max_position_embeddings {limit}")
            out.append(p.astype(np.int32).tolist())
        return out

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise TokenizerError("this checkpoint has no tokenizer.model, so it takes token ids, not text "
                                 "(generate_ids, logits)")
        return self.tokenizer

    def generate(self, text_or_texts, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_ids=None,
                 stop_strings=(), return_logprobs: bool = False, stream=None, hooks=None):
        """Text in, generated text out (a list for a list of prompts).

        Generation of a row ends at a stop id or the first of `stop_strings` (one string or a
        list), which is cut from the returned text. With one prompt, `stream(piece)` gets the text
        as it is generated (the same callback as `chat`'s). With return_logprobs, returns
        (text, logprobs): the log-probabilities of the generated tokens, as `generate_ids` gives them.
        """
        tok = self._need_tokenizer()
        single = isinstance(text_or_texts, str)
        texts = [text_or_texts] if single else text_or_texts
        if isinstance(texts, bytes) or not hasattr(texts, "__iter__"):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise GenerationError("generate takes a string or a list of strings (token ids go to generate_ids)")
        if stream is not None and not single:
            raise GenerationError("stream(piece) follows one prompt: pass a string, or stream a batch's token "
                                  "ids with generate_ids(stream=...)")
        texts_out, logprobs = self._generate_text([tok.encode(t) for t in texts], max_new_tokens, temperature,
                                                  top_k, top_p, seed, stop_ids, stop_strings, stream, hooks)
        out = texts_out[0] if single else texts_out
        return (out, logprobs[0] if single else logprobs) if return_logprobs else out

    def chat(self, messages, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop_strings=(), fold_system: bool = False,
             stream=None, hooks=None) -> str:
        """The model's reply to a conversation [{"role": "user", "content": ...}, ...];
        `stream(piece)` gets the reply as it is generated. fold_system=True prepends a leading
        system message to the first user turn (Gemma 2's template has no system role)."""
        tok = self._need_tokenizer()
        ids = tok.encode_chat(messages, add_generation_prompt=True, fold_system=fold_system)
        return self._generate_text([ids], max_new_tokens, temperature, top_k, top_p, seed, self.chat_stop_ids(),
                                   stop_strings, stream, hooks)[0][0]

    def chat_stop_ids(self) -> tuple[int, ...]:
        """Ids that end a chat reply: the config's eos ids, the tokenizer's eos and <end_of_turn>
        (jpn-it's config lists only eos)."""
        return tuple(dict.fromkeys((*self.config.eos_token_ids, *self._need_tokenizer().stop_ids_for_chat())))

    def _generate_text(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_ids,
                       stop_strings, stream, hooks=None) -> tuple[list[str], list[list[float]]]:
        """(texts, logprobs) for token-id prompts; `stream(piece)` follows row 0 (one prompt)."""
        tok = self.tokenizer
        stop_strings = checks.strings("stop_strings", stop_strings)
        checks.callback("stream", stream)
        streams = [TextStream(tok, stop_strings) for _ in prompts]

        def on_tokens(new_per_row):
            finished = []
            for row, new in enumerate(new_per_row):
                piece = streams[row].add(new)
                if piece and stream is not None:
                    stream(piece)
                if streams[row].stopped:
                    finished.append(row)
            return finished

        live = stream is not None or bool(stop_strings)
        ids, logprobs = self.generate_ids(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_ids,
                                          return_logprobs=True, stream=on_tokens if live else None, hooks=hooks)
        if live:
            for s in streams:
                piece = s.flush()   # text held back while generating (a possible stop string's start)
                if piece and stream is not None:
                    stream(piece)
        return [s.text if live else tok.decode(row) for s, row in zip(streams, ids)], logprobs


class TextStream:
    """Incremental detokenization: hands out only complete characters, cuts at stop strings.

    Each call decodes only the tokens since the last complete character (and a few before them,
    so that pieces join as in a full decode): a long generation costs time linear in its length.
    """

    CONTEXT = 4  # settled tokens decoded again before the unsettled ones

    def __init__(self, tokenizer, stop_strings=()):
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._settled_ids, self._settled = 0, ""   # a prefix of ids ending on a complete character, and its text

    def _decoded(self) -> str:
        """tokenizer.decode(self.ids), from the settled prefix on."""
        start = max(0, self._settled_ids - self.CONTEXT)
        head = self.tokenizer.decode(self.ids[start:self._settled_ids])
        tail = self.tokenizer.decode(self.ids[start:])
        full = self._settled + tail[len(head):] if tail.startswith(head) else self.tokenizer.decode(self.ids)
        if not full.endswith("\ufffd"):
            self._settled_ids, self._settled = len(self.ids), full
        return full

    def add(self, new_ids) -> str:
        if self.stopped or not len(new_ids):
            return ""
        self.ids.extend(new_ids)
        full = self._decoded()
        cuts = [full.find(s) for s in self.stop_strings if s in full]
        if cuts:
            full, self.stopped = full[:min(cuts)], True
        else:
            full = full.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its other bytes
            # hold back a tail that may begin a stop string, so text handed out is never taken back
            hold = max((k for s in self.stop_strings for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
            full = full[:len(full) - hold]
        if not full.startswith(self.text):  # cannot happen given the hold-back; never hand out less
            return ""
        piece, self.text = full[len(self.text):], full
        return piece

    def flush(self) -> str:
        """Once generation has ended: the text held back (a tail that could have begun a stop
        string; an incomplete last character, as U+FFFD like tokenizer.decode), so that the text
        handed out equals the decoded tokens cut at the first stop string."""
        if self.stopped or not self.ids:
            return ""
        full = self._decoded()
        piece, self.text = full[len(self.text):], full
        return piece


def load(ckpt_dir: str | Path, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
         quantize: str | None = None, int8_mode: str | None = None,
         attention: str | AttentionConfig | None = None) -> Gemma:
    """Load a converted checkpoint. dtype: 'float32' | 'bfloat16' | None (the stored dtype): the
    compute dtype (and that of the float params).
    attention: 'auto' (default) | 'xla' | 'blockwise' | 'splash' | an AttentionConfig.

    quantize="int8" quantizes a float checkpoint while loading, one layer at a time (a checkpoint
    converted with quantize="int8" is int8 already). int8_mode picks the int8 product (see
    quant.py): "dynamic" (int8 activations; the default on CPU) or "weight-only" (the default on
    GPU/TPU). With a mesh (see sharding.make_mesh) the params are restored straight into sharded
    arrays: each process reads only the shards its devices hold.
    """
    ckpt_dir = Path(ckpt_dir).expanduser()
    attention = attention_config(attention)
    info = checkpoint.read_info(ckpt_dir)
    config = info.config
    dtype = dtype or info.param_dtype
    if dtype not in DTYPES:
        raise GenerationError(f"dtype {dtype!r} is not supported (float32 or bfloat16)")
    if quantize not in (None, *quant.METHODS):
        raise GenerationError(f"quantize {quantize!r} is not supported (None or {', '.join(map(repr, quant.METHODS))})")
    quantized = info.quantization or quantize
    if int8_mode is not None and (int8_mode not in quant.MODES or not quantized):
        raise GenerationError(f"int8_mode {int8_mode!r}: choose one of {', '.join(quant.MODES)}, for int8 weights "
                              "(an int8 checkpoint or quantize='int8')")
    mode = (int8_mode or quant.default_mode()) if quantized else None
    jdtype = DTYPES[dtype]
    abstract = abstract_model(config, param_dtype=jdtype, dtype=jdtype, int8_mode=mode, attention=attention)
    shapes = checkpoint.param_shapes(abstract)
    if mesh is None:
        shardings = dict.fromkeys(shapes, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    else:
        from gemma_jax.sharding import param_shardings
        shardings = param_shardings(shapes, config, mesh)
    if quantized and not info.quantization:
        stored = checkpoint.param_shapes(abstract_model(config, param_dtype=jdtype, dtype=jdtype))
        expected = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32 if weight_in_axis(k) is not None else v.dtype)
                    for k, v in stored.items()}
        params = checkpoint.restore_quantizing(ckpt_dir, expected, mode, shardings)
    else:
        expected = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in shapes.items()}
        params = checkpoint.restore(ckpt_dir, expected)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, checkpoint.unflatten(params, int8_mode=mode))
    model = nnx.merge(graphdef, state)
    tokenizer = None
    if (ckpt_dir / "tokenizer.model").is_file():
        from gemma_jax.tokenizer import Tokenizer
        tokenizer = Tokenizer.load(ckpt_dir / "tokenizer.model")
    return Gemma(model, tokenizer, mesh)


def _array(value, what: str) -> np.ndarray:
    """np.asarray, with ragged rows refused in one line instead of NumPy's error."""
    try:
        return np.asarray(value)
    except ValueError:
        lengths = [len(row) if hasattr(row, "__len__") else 1 for row in value]
        raise GenerationError(f"{what} has rows of different lengths {lengths}: pad them to one length "
                              "and pass attention_mask (0 at padding)") from None
