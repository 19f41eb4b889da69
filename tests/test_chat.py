"""Text generation and multi-turn chat with the real Gemma 2 vocabulary on a tiny random model:
streaming, stop strings, and the chat session's KV-cache reuse across turns."""

import io
import sys
from pathlib import Path

import pytest

import gemma_jax
from gemma_jax import cli
from gemma_jax.api import TextStream
from gemma_jax.chat import ChatSession
from gemma_jax.errors import GenerationError
from hf_oracle import TINY_REAL_VOCAB, with_real_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = with_real_tokenizer(tmp_path_factory.mktemp("chat"), seed=2, max_position_embeddings=1024, **TINY_REAL_VOCAB)
    return gemma_jax.load(ckpt)


def test_streamed_text_equals_returned_text(model):
    pieces = []
    text = model.generate("日本の首都は", max_new_tokens=24, temperature=1.0, seed=3,
                          stream=lambda row, piece: pieces.append(piece))
    assert "".join(pieces) == text and text
    ids = model.generate_ids([model.tokenizer.encode("日本の首都は")], 24, temperature=1.0, seed=3)[0]
    assert text == model.tokenizer.decode(ids)


def test_stop_strings_cut_each_row(model):
    prompts = ["Hello", "こんにちは"]
    full = model.generate(prompts, max_new_tokens=20, stop_ids=[])
    stop = full[0][3:6]  # a string that occurs in row 0's continuation
    assert len(stop) == 3
    cut = model.generate(prompts, max_new_tokens=20, stop_ids=[], stop_strings=[stop])
    assert cut[0] == full[0][:full[0].find(stop)]
    assert cut[1] == (full[1][:full[1].find(stop)] if stop in full[1] else full[1])


def test_text_stream_holds_back_partial_characters_and_stop_prefixes(model):
    tok = model.tokenizer
    ids = tok.encode("日本🇯🇵 end", add_bos=False)
    stream = TextStream(tok)
    assert "".join(stream.add([i]) for i in ids) == "日本🇯🇵 end"   # byte pieces never split a character
    stream = TextStream(tok, stop_strings=["STOP"])
    out = "".join(stream.add([i]) for i in tok.encode("abc STO", add_bos=False))
    assert out == "abc "                                   # "STO" might begin the stop string
    out += "".join(stream.add([i]) for i in tok.encode("P more", add_bos=False))
    assert stream.stopped and out == stream.text == "abc "


def test_chat_session_reuses_the_cache(model):
    """Turn 2 feeds only its new tokens; its reply equals greedy generation on the whole history."""
    session = ChatSession(model, max_new_tokens=12)
    first = session.send("Hello! Who are you?")
    cached_after_first = session.cached
    history = list(session.history)
    assert cached_after_first > 0 and history[:2] == [2, 106]
    second = session.send("Tell me more.")
    turn = model.tokenizer.encode_chat([{"role": "user", "content": "Tell me more."}])[1:]
    expected = model.generate_ids([history + turn], 12,
                                  stop_ids=list(model.config.eos_token_ids) + [107])[0]
    reply_ids = session.history[len(history) + len(turn):-2]
    assert reply_ids == expected and session.history[-2:] == [107, 108]
    assert second == model.tokenizer.decode(expected) and isinstance(first, str)
    assert session.cached > cached_after_first
    session.reset()
    assert session.cached == 0 and session.history == [2]


def test_chat_session_grows_its_cache(model):
    """A long second turn outgrows the first turn's cache: kv.grow keeps what it holds."""
    session = ChatSession(model, max_new_tokens=8)
    session.send("Hi")
    first_capacity, history = session.capacity, list(session.history)
    assert first_capacity == 256 and session.cached > 0
    text = "x " * 300                   # the whole conversation no longer fits in 256 positions
    session.send(text)
    assert session.capacity == 512 and session.capacity >= session.cached + 8
    assert session.cache.layers[1].k.shape[1] == session.capacity   # layer 1 is global: full length
    turn = model.tokenizer.encode_chat([{"role": "user", "content": text}])[1:]
    expected = model.generate_ids([history + turn], 8, stop_ids=list(model.config.eos_token_ids) + [107])[0]
    assert session.history[len(history) + len(turn):-2] == expected


def test_chat_session_refuses_a_bad_max_new_tokens(model):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(GenerationError, match="max_new_tokens must be an integer >= 1"):
            ChatSession(model, max_new_tokens=bad)


def test_chat_stops_at_end_of_turn_and_every_eos(model):
    stops = model.chat_stop_ids()
    assert model.tokenizer.token_id("<end_of_turn>") in stops
    assert set(model.config.eos_token_ids) | {model.tokenizer.eos_id} <= set(stops)
    assert len(stops) == len(set(stops)) and ChatSession(model).stop_ids == stops


def test_chat_cli_conversation(model, monkeypatch, capsys):
    ckpt = model_dir(model)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nこんにちは\n"))   # then Ctrl-D
    assert cli.main(["--no-compile-cache", "chat", "--ckpt", str(ckpt), "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("model> ") == 2 and "(history cleared)" in captured.err


def model_dir(model) -> Path:
    return Path(model.tokenizer.path).parent
