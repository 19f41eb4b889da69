"""A multi-turn chat that keeps its KV cache between turns: each turn runs only its new tokens."""

from __future__ import annotations

from gemma_jax import cache as kv
from gemma_jax import sampler
from gemma_jax.api import Gemma, TextStream, check_max_new_tokens
from gemma_jax.errors import GenerationError
from gemma_jax.tokenizer import END_OF_TURN


class ChatSession:
    """history holds every token of the conversation as the model sees it; the cache holds the
    first `cache.end` of them. A turn feeds the rest plus the new user turn, then generates."""

    def __init__(self, model: Gemma, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0):
        check_max_new_tokens(max_new_tokens, minimum=1)  # a turn always ends with a reply
        self.model, self.tokenizer = model, model._need_tokenizer()
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.sampling = sampler.Sampling(temperature, top_k, top_p)
        self.end_of_turn = self.tokenizer.token_id(END_OF_TURN)
        self.newline = self.tokenizer.encode("\n", add_bos=False)
        self.stop_ids = model.chat_stop_ids()
        self.reset()

    def reset(self) -> None:
        self.history: list[int] = [self.tokenizer.bos_id]
        self.cache: kv.KVCache | None = None
        self.capacity = 0
        self.turns = 0

    @property
    def cached(self) -> int:
        """How many history tokens are already in the KV cache."""
        return 0 if self.cache is None else int(self.cache.end[0])

    def send(self, text: str, stream=None) -> str:
        """Add a user turn, generate the reply (streamed as text to `stream(piece)`), return it."""
        turn = self.tokenizer.encode_chat([{"role": "user", "content": text}])[1:]  # without BOS
        start = self.cached
        chunk = self.history[start:] + turn
        needed = start + len(chunk) + self.max_new_tokens
        limit = self.model.config.max_position_embeddings
        if needed > limit:
            raise GenerationError(f"the conversation would reach {needed} tokens, over the model's "
                                  f"max_position_embeddings {limit}: start a new chat (/reset)")
        config = self.model.config
        if self.cache is None:
            self.capacity = sampler.bucket(needed, 256)
            self.cache = self.model.new_cache(1, self.capacity)
        elif needed > self.capacity:
            self.capacity = sampler.bucket(needed, 256)
            self.cache = kv.grow(self.cache, config, self.capacity)
        text_stream = TextStream(self.tokenizer)

        def on_tokens(new_per_row):
            piece = text_stream.add(new_per_row[0])
            if piece and stream is not None:
                stream(piece)

        result, self.cache = sampler.run(
            self.model.graphdef, self.model.state, self.cache, [chunk], [start], self.max_new_tokens,
            self.sampling, self.seed + self.turns, self.stop_ids, config.pad_token_id, fresh=start == 0,
            stream=on_tokens)
        rest = text_stream.flush()  # an incomplete last character, held back while generating
        if rest and stream is not None:
            stream(rest)
        reply = result.tokens[0]
        self.history += turn + reply + [self.end_of_turn] + self.newline
        self.turns += 1
        return self.tokenizer.decode(reply)
