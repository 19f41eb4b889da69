"""Text generation and multi-turn chat with the real Gemma 2 vocabulary on a tiny random model:
streaming, stop strings, and the chat session's KV-cache reuse across turns."""

import io
import os
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import gemma_jax
from gemma_jax import cli
from gemma_jax.api import TextStream
from gemma_jax.chat import ChatSession
from gemma_jax.errors import GemmaWarning, GenerationError
from hf_oracle import TINY_REAL_VOCAB, with_real_tokenizer

END_OF_TURN, NEWLINE = 107, 108


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = with_real_tokenizer(tmp_path_factory.mktemp("chat"), seed=2, max_position_embeddings=1024, **TINY_REAL_VOCAB)
    return gemma_jax.load(ckpt)


def test_streamed_text_equals_returned_text(model):
    """stream(piece) (chat's signature too) gets exactly the returned text; return_logprobs gives
    generate_ids' log-probabilities; NumPy integers are accepted where an int is meant."""
    pieces = []
    text, logprobs = model.generate("日本の首都は", max_new_tokens=24, temperature=1.0, seed=np.int64(3),
                                    stream=pieces.append, return_logprobs=True)
    assert "".join(pieces) == text and text
    ids, expected = model.generate_ids([model.tokenizer.encode("日本の首都は")], np.int64(24), temperature=1.0,
                                       seed=3, return_logprobs=True)
    assert text == model.tokenizer.decode(ids[0]) and logprobs == expected[0] and len(logprobs) == len(ids[0])
    with pytest.raises(GenerationError, match=r"stream\(piece\) follows one prompt"):
        model.generate(["a", "b"], max_new_tokens=2, stream=pieces.append)


def test_stop_strings_cut_each_row(model):
    prompts = ["Hello", "こんにちは"]
    full = model.generate(prompts, max_new_tokens=20, stop_ids=[])
    stop = full[0][3:6]  # a string that occurs in row 0's continuation
    assert len(stop) == 3
    cut = model.generate(prompts, max_new_tokens=20, stop_ids=[], stop_strings=[stop])
    assert cut[0] == full[0][:full[0].find(stop)]
    assert cut[1] == (full[1][:full[1].find(stop)] if stop in full[1] else full[1])
    # a plain string is one stop string, not its characters
    assert model.generate(prompts, max_new_tokens=20, stop_ids=[], stop_strings=stop) == cut


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
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/help\n/bogus\n//slash\n/reset\nこんにちは\n"))   # then Ctrl-D
    sys.modules.pop("readline", None)
    assert cli.main(["--no-compile-cache", "chat", "--ckpt", str(ckpt), "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("model> ") == 3          # /help, /bogus and /reset never reach the model
    assert "(history cleared)" in captured.err
    assert all(f"  {name} " in captured.err for name in cli.CHAT_COMMANDS)
    assert "unknown command /bogus (not sent to the model): /help lists the commands" in captured.err
    assert "readline" in sys.modules                    # line editing and history where Python has it


def test_ctrl_c_in_the_cli_stops_the_reply_not_the_chat(model, monkeypatch, capsys):
    """A real SIGINT during the first reply: that reply stops, the chat answers the next message."""
    written = []

    def write(text):
        sys.stdout.write(text)
        written.append(text)
        if len(written) == 3:               # "model> ", then two pieces of the first reply
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(cli, "_write", write)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me a long story.\nhello\n"))
    before = signal.getsignal(signal.SIGINT)    # SIG_IGN where the test runner was started in the background
    code = cli.main(["--no-compile-cache", "chat", "--ckpt", str(model_dir(model)), "--max-new-tokens", "12"])
    captured = capsys.readouterr()
    assert code == 0 and captured.err.count("(reply stopped)") == 1, captured.err
    first, second = captured.out.split("model> ")[1:]
    assert len(written) > 4 and second.strip()
    assert signal.getsignal(signal.SIGINT) is before        # the chat's own handler is gone again


def model_dir(model) -> Path:
    return Path(model.tokenizer.path).parent


def _reference_reply(model, history, text, max_new_tokens):
    """Greedy reply ids to `text` after `history`, from a fresh cache (no session)."""
    turn = model.tokenizer.encode_chat([{"role": "user", "content": text}])[1:]
    return model.generate_ids([history + turn], max_new_tokens, stop_ids=list(model.chat_stop_ids()))[0]


def test_interrupted_reply_keeps_the_session_consistent(model):
    """A stream that raises KeyboardInterrupt (Ctrl-C in the CLI) stops the reply: the partial reply
    stays as the model's turn, closed with <end_of_turn>, the cache agrees with the history, and
    the next turn equals a fresh session fed the same history (and a no-cache reference)."""
    session = ChatSession(model, max_new_tokens=12)
    session.send("Hello! Who are you?")
    before, pieces = list(session.history), []

    def stream(piece):
        pieces.append(piece)
        if len(pieces) == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        session.send("Tell me more.", stream=stream)
    turn = model.tokenizer.encode_chat([{"role": "user", "content": "Tell me more."}])[1:]
    partial = session.history[len(before) + len(turn):-2]
    assert session.history[:len(before) + len(turn)] == before + turn
    assert session.history[-2:] == [END_OF_TURN, NEWLINE] and 0 < len(partial) < 12
    assert partial == _reference_reply(model, before, "Tell me more.", 12)[:len(partial)]
    assert session.cached <= len(session.history) and session.turns == 2
    history = list(session.history)
    reply = session.send("Go on.")
    fresh = ChatSession(model, max_new_tokens=12)
    fresh.history = list(history)
    assert reply == fresh.send("Go on.") and session.history == fresh.history
    turn = model.tokenizer.encode_chat([{"role": "user", "content": "Go on."}])[1:]
    assert session.history[len(history) + len(turn):-2] == _reference_reply(model, history, "Go on.", 12)


def test_a_failed_turn_leaves_the_conversation_as_it_was(model):
    """Any other exception during a reply (here from the stream) rolls the turn back."""
    session = ChatSession(model, max_new_tokens=6)
    session.send("Hi")
    history = list(session.history)

    def stream(piece):
        raise RuntimeError("display failed")
    with pytest.raises(RuntimeError, match="display failed"):
        session.send("And?", stream=stream)
    assert session.history == history and session.cached == 0    # the donated cache is dropped
    ids = model.tokenizer.encode(session.send("And?"), add_bos=False)
    assert session.history[len(history):][-2:] == [END_OF_TURN, NEWLINE]
    assert model.tokenizer.decode(_reference_reply(model, history, "And?", 6)) == model.tokenizer.decode(ids)


def test_system_text_is_folded_into_the_first_turn(model):
    system, text = "Answer briefly.", "Who are you?"
    session = ChatSession(model, max_new_tokens=4, system=system)
    reply = session.send(text)
    folded = model.tokenizer.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": text}],
                                         fold_system=True)
    assert session.history[:len(folded)] == folded
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    assert model.chat(messages, max_new_tokens=4, fold_system=True) == reply
    second = session.send("More?")        # later turns carry no system text
    assert isinstance(second, str) and system not in model.tokenizer.decode(session.history[len(folded):])


def test_a_turn_is_clamped_to_the_room_left_once_said(chat_ckpt):
    """On a 64-token context: the second turn's reply is shortened to the room left (a warning,
    once), equal to greedy generation of that many tokens; a message with no room left is refused."""
    model = gemma_jax.load(chat_ckpt)
    limit = model.config.max_position_embeddings
    session = ChatSession(model, max_new_tokens=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session.send("hello")
        assert caught == [] and len(session.history) < limit - 20
        history = list(session.history)
        turn = model.tokenizer.encode_chat([{"role": "user", "content": "hi"}])[1:]
        room = limit - len(history) - len(turn) - 2        # room for <end_of_turn>\n kept
        assert 0 < room < 30
        session.send("hi")
        assert len(caught) == 1 and caught[0].category is GemmaWarning
        assert f"shortened to the room left ({room} tokens for this one)" in str(caught[0].message)
        expected = model.generate_ids([history + turn], room, stop_ids=list(model.chat_stop_ids()))[0]
        assert session.history[len(history) + len(turn):-2] == expected
        assert len(session.history) <= limit
        if limit - len(session.history) - len(turn) - 2 >= 1:     # another shortened turn: no second warning
            session.send("hi")
        assert len(caught) == 1
    with pytest.raises(GenerationError, match="leaves no room for a reply"):
        session.send("hello " * 60)
