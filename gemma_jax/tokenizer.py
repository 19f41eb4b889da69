"""SentencePiece wrapper and the Gemma 2 chat template, id-exact with Hugging Face.

The chat template is built as ids, piece by piece, instead of rendering text and encoding it again
(which gives a double BOS). `<start_of_turn>`, `<end_of_turn>` and newline runs are user-defined
pieces, so BPE never merges across them; every chunk boundary sits next to one, and the ids equal
HF's `apply_chat_template(..., tokenize=True)` on the whole rendered string.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import sentencepiece as spm

from gemma_jax.errors import TokenizerError

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
BOS_TEXT = "<bos>"
_ROLES = {"user": "user", "assistant": "model", "model": "model"}


def _chat_turns(messages: object, fold_system: bool) -> list[tuple[str, str]]:
    """Validates a conversation; returns (template role, trimmed content) pairs."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("chat messages must be a non-empty list of {'role', 'content'} dicts")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TokenizerError(f"chat message {i} must be a dict with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if not isinstance(content, str):
            raise TokenizerError(
                f"chat message {i} (role {role!r}): content must be a str,"
                f" got {type(content).__name__}"
            )
        if role == "system":
            if i != 0 or not fold_system:
                raise TokenizerError(
                    f"chat message {i}: the 'system' role is not supported by the Gemma 2 template"
                    + ("" if i else " (to prepend it to the first user turn: fold_system=True in Gemma.chat or "
                                    "Tokenizer.encode_chat, system= in ChatSession, --system on the command line)")
                )
            turns.append(("system", content))
            continue
        if not isinstance(role, str) or role not in _ROLES:
            raise TokenizerError(
                f"chat message {i}: unknown role {role!r} (expected 'user', 'assistant' or 'model')"
            )
        turns.append((_ROLES[role], content))
    folded = turns[0][0] == "system"
    if folded:
        if len(turns) < 2 or turns[1][0] != "user":
            raise TokenizerError("chat message 1: a system message must be followed by a user one")
        turns = [("user", turns[0][1].strip() + "\n\n" + turns[1][1].strip())] + turns[2:]
    for i, (role, _) in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "model"):
            raise TokenizerError(
                f"chat message {i + folded}: roles must alternate user/assistant starting with"
                f" user, got {messages[i + folded]['role']!r}"
            )
    # Jinja's `trim` filter is Python's str.strip().
    return [(role, content.strip()) for role, content in turns]


def render_chat(
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = True,
    fold_system: bool = False,
) -> str:
    """The text HF's Gemma 2 chat template renders (for display and debugging; do not re-encode).

    `fold_system=True` prepends a leading system message's trimmed content to the first user
    turn's trimmed content, separated by "\\n\\n"; by default a system message is a TokenizerError,
    as in HF.
    """
    parts = [BOS_TEXT]
    for role, content in _chat_turns(messages, fold_system):
        parts.append(f"{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n")
    if add_generation_prompt:
        parts.append(f"{START_OF_TURN}model\n")
    return "".join(parts)


class Tokenizer:
    """The Gemma SentencePiece model: plain encode/decode plus the chat template as ids."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str = "<memory>"):
        self._sp = processor
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a `tokenizer.model` file (or a directory holding one)."""
        path = os.path.expanduser(os.fspath(path))
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            processor = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerError(f"{path} is not a SentencePiece model ({reason})") from None
        return cls(processor, path)

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def token_id(self, name: str) -> int:
        """The id of a piece by its exact text, e.g. "<start_of_turn>" -> 106."""
        if not isinstance(name, str):
            raise TokenizerError(f"token name must be a str, got {type(name).__name__}")
        token = self._sp.piece_to_id(name)
        if token == self._sp.unk_id() and name != self._sp.id_to_piece(token):
            raise TokenizerError(f"unknown piece {name!r} in tokenizer {self.path}")
        return token

    def id_to_piece(self, token: int) -> str:
        return self._sp.id_to_piece(self._check_id(token))

    def _check_id(self, token: object) -> int:
        try:
            value = int(token)  # accepts numpy integers
        except (TypeError, ValueError):
            raise TokenizerError(f"token id must be an int, got {token!r}") from None
        if value != token or not 0 <= value < self.vocab_size:
            raise TokenizerError(
                f"token id {token!r} is outside the vocabulary [0, {self.vocab_size})"
            )
        return value

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Ids of `text`; BOS is added and EOS is not, as in HF's default."""
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a str, got {type(text).__name__}")
        ids = self._sp.encode(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping the control ids pad/bos/eos."""
        control = {self.pad_id, self.bos_id, self.eos_id}
        checked = [self._check_id(t) for t in ids]
        return self._sp.decode([t for t in checked if t not in control])

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        fold_system: bool = False,
    ) -> list[int]:
        """Ids of the Gemma 2 chat template: HF `apply_chat_template(..., tokenize=True)` exactly.

        One BOS, then `<start_of_turn>{role}\\n{content.strip()}<end_of_turn>\\n` per message
        ("assistant" written as "model"), then `<start_of_turn>model\\n` if add_generation_prompt.
        Roles must alternate user/assistant ("model" is an alias) starting with user.
        `fold_system=True` prepends a leading system message's trimmed content to the first user
        turn's trimmed content, separated by "\\n\\n"; by default a system message is a
        TokenizerError, as in HF.
        Content is tokenized like HF does, so literal "<start_of_turn>"-style markup in it becomes
        the special id; literal "<bos>"/"<eos>"/"<pad>"/"<unk>" stay plain text (HF: special ids).
        """
        turns = _chat_turns(messages, fold_system)
        start, end = self.token_id(START_OF_TURN), self.token_id(END_OF_TURN)
        newline = self._sp.encode("\n")
        ids = [self.bos_id]
        for role, content in turns:
            # "\n" is a user-defined piece: "role\ncontent" never merges across it.
            ids += [start] + self._sp.encode(f"{role}\n{content}") + [end] + newline
        if add_generation_prompt:
            ids += [start] + self._sp.encode("model\n")
        return ids

    def stop_ids_for_chat(self) -> tuple[int, int]:
        """Ids that end a chat reply: (eos, <end_of_turn>); jpn-it's config lists only eos."""
        return self.eos_id, self.token_id(END_OF_TURN)
