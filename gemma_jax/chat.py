"""A multi-turn chat that keeps its KV cache between turns: each turn runs only its new tokens."""

from __future__ import annotations

import warnings

from gemma_jax import cache as kv
from gemma_jax import checks, sampler
from gemma_jax.api import Gemma, TextStream
from gemma_jax.errors import GemmaWarning, GenerationError
from gemma_jax.tokenizer import END_OF_TURN


class ChatSession:
    """history holds every token of the conversation as the model sees it; the cache holds the
    first `cache.end` of them. A turn feeds the rest plus the new user turn, then generates.

    A reply gets at most max_new_tokens, fewer when the model's context has less room left (said
    once per conversation, as a GemmaWarning). `system` text is folded into the first user turn.
    """

    def __init__(self, model: Gemma, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_strings=(),
                 system: str | None = None):
        self.max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, minimum=1)  # a turn always replies
        self.seed = checks.seed(seed)
        self.sampling = sampler.Sampling(temperature, top_k, top_p)
        self.stop_strings = checks.strings("stop_strings", stop_strings)
        if system is not None and not isinstance(system, str):
            raise GenerationError(f"{checks.name('system')} must be a string, got {system!r}")
        self.model, self.tokenizer, self.system = model, model._need_tokenizer(), system
        self.end_of_turn = self.tokenizer.token_id(END_OF_TURN)
        self.newline = self.tokenizer.encode("\n", add_bos=False)
        self.stop_ids = model.chat_stop_ids()
        self.reset()

    def reset(self) -> None:
        self.history: list[int] = [self.tokenizer.bos_id]
        self.cache: kv.KVCache | None = None
        self.capacity = 0
        self.turns = 0
        self.clamped = False     # whether a reply has been shortened to fit the context (warned once)

    @property
    def cached(self) -> int:
        """How many history tokens are already in the KV cache."""
        return 0 if self.cache is None else int(self.cache.end[0])

    def _user_turn(self, text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        if self.system is not None and self.turns == 0:
            messages.insert(0, {"role": "system", "content": self.system})
        return self.tokenizer.encode_chat(messages, fold_system=True)[1:]   # without BOS

    def send(self, text: str, stream=None) -> str:
        """Add a user turn, generate the reply (streamed as text to `stream(piece)`), return it.

        A KeyboardInterrupt raised by `stream` stops the reply: what was generated is kept as the
        model's turn (closed with <end_of_turn>) and the interrupt is raised again. Any other
        exception during generation leaves the conversation as it was before this turn.
        """
        if not isinstance(text, str):
            raise GenerationError(f"a chat message must be a string, got {type(text).__name__}")
        checks.callback("stream", stream)
        turn = self._user_turn(text)
        start = self.cached
        chunk = self.history[start:] + turn
        config = self.model.config
        limit = config.max_position_embeddings
        room = limit - start - len(chunk) - 1 - len(self.newline)   # the reply closes with <end_of_turn>\n
        if room < 1:
            raise GenerationError(f"this message ({len(turn)} tokens) leaves no room for a reply in the "
                                  f"model's context ({len(self.history)} of max_position_embeddings {limit} "
                                  "already used): start a new chat (/reset) or shorten it")
        budget = min(self.max_new_tokens, room)
        if budget < self.max_new_tokens and not self.clamped:
            self.clamped = True
            warnings.warn(f"the conversation nears the model's context (max_position_embeddings {limit}): "
                          f"replies are now shortened to the room left ({budget} tokens for this one); "
                          "/reset starts over", GemmaWarning, stacklevel=2)
        needed = start + len(chunk) + budget
        if self.cache is None:
            self.capacity = min(sampler.bucket(needed, 256), limit)
            self.cache = self.model.new_cache(1, self.capacity)
        elif needed > self.capacity:
            self.capacity = min(sampler.bucket(needed, 256), limit)
            self.cache = kv.grow(self.cache, config, self.capacity)
        text_stream = TextStream(self.tokenizer, self.stop_strings)
        interrupted = []

        def on_tokens(new_per_row):
            piece = text_stream.add(new_per_row[0])
            if piece and stream is not None:
                try:
                    stream(piece)
                except KeyboardInterrupt as e:
                    interrupted.append(e)
            return [0] if interrupted or text_stream.stopped else []

        live = stream is not None or bool(self.stop_strings)
        try:
            result, self.cache = sampler.run(
                self.model.graphdef, self.model.state, self.cache, [chunk], [start], budget, self.sampling,
                (self.seed + self.turns) % 2**32, self.stop_ids, config.pad_token_id, fresh=start == 0,
                stream=on_tokens if live else None)
        except BaseException:
            # the cache was donated to the interrupted call: drop it; history is still this turn's start
            self.cache, self.capacity = None, 0
            raise
        rest = text_stream.flush() if live else ""   # text held back while generating
        if rest and stream is not None:
            stream(rest)
        reply = result.tokens[0]
        self.history += turn + reply + [self.end_of_turn] + self.newline
        self.turns += 1
        if interrupted:
            raise interrupted[0]
        return text_stream.text if live else self.tokenizer.decode(reply)
