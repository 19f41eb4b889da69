"""Tokenizer and chat template: id parity with Hugging Face on the real Gemma 2 vocabulary.

The vocabulary comes from GEMMA_JAX_TOKENIZER_DIR (a directory with tokenizer.model,
tokenizer.json and tokenizer_config.json); tests that need it skip when it is absent.
HF's tokenizer is loaded from tokenizer.json, offline.
"""

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma_jax.errors import TokenizerError
from gemma_jax.tokenizer import Tokenizer, render_chat

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# --------------------------------------------------------------------------- string pool

JAPANESE = [
    "こんにちは、世界。今日はいい天気ですね。",
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
    "カタカナのテキスト：コンピューター、プログラミング、データベース。",
    "東京特許許可局の局長は今日も急遽休暇を許可しなかった。",
    "ｶﾀｶﾅ半角とＡＢＣ全角、①②③と㈱。",
    "「引用」と『二重引用』、（括弧）【隅付き】…〜！？",
    "日本語の文章にEnglish wordsと123の数字が混ざる。",
    "ひらがなだけのぶんしょうをかいてみました",
    "漢字検定一級の難読漢字：鬱、麒麟、薔薇、顰蹙。",
    "\u3000全角スペースで始まる行\u3000",
]
ENGLISH = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "It's a well-known fact that tokenizers don't like edge-cases; do they?",
    "  leading spaces and trailing spaces  ",
    "UPPER lower MiXeD CamelCaseWords snake_case_words kebab-case-words",
    "e-mail: someone@example.com, url: https://example.com/path?q=1&r=2#frag",
]
CODE = [
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "import numpy as np\n\nx = np.arange(10)\nprint(x[::2])  # every other\n",
    "class Foo:\n\tdef __init__(self):\n\t\tself.x = {'a': [1, 2, 3]}\n",
    "const f = async (x) => { await g(x ?? 0); return `v=${x}`; };",
    "function add(a, b) {\n  return a + b;\n}\nconsole.log(add(1, 2));",
    "if (a != b && c <= d || !e) { x += 1; } else { y -= 2; }",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "<div class=\"x\"><p>HTML</p><br/></div>",
    "<start_of_turn>user\nliteral chat markup<end_of_turn>\n",
]
EMOJI = [
    "😀",
    "👍🏽 thumbs",
    "👨‍👩‍👧‍👦 family ZWJ",
    "🏳️‍🌈 and 🏴‍☠️",
    "🇯🇵🇺🇸🇫🇷 flags",
    "1️⃣ keycap #️⃣",
    "🧑🏿‍💻 technologist",
    "emoji🎉inside🎊words",
]
MIXED = [
    "Русский текст и English.",
    "한국어 문장입니다.",
    "中文句子，简体和繁體。",
    "العربية من اليمين إلى اليسار",
    "हिन्दी पाठ",
    "ภาษาไทยไม่มีช่องว่าง",
    "Ελληνικά κείμενα",
    "Ünïcödé àccénts ßtraße œuvre",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝐛𝐨𝐥𝐝 ∀x∈ℝ: x²≥0",
    "control\x00nul\x07bell\x1bescape\r\nCRLF",
]
DIGITS = ["0", "1234567890", "3.14159265358979", "2024-06-01T12:34:56Z", "-42e10", "1,000,000"]
PUNCT = ["!?.,;:", "...!!!???", "—–-", "@#$%^&*()_+=[]{}|\\/<>~`'\"", "。、・：；"]
SPECIAL_CHARS = [" ", "\t", "\n"]


def _string_pool() -> list[str]:
    """A few hundred varied strings, the same on every run."""
    base = JAPANESE + ENGLISH + CODE + EMOJI + MIXED + DIGITS + PUNCT + [""]
    runs = [c * n for c in SPECIAL_CHARS for n in (1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 40)]
    runs += [" \t" * 5, "\n \n", "\t\n\t\n", "x" + " " * 40 + "y", "a" + "\n" * 40 + "b"]
    rng = random.Random(1234)
    fragments = base + runs
    combos = []
    for _ in range(220):
        k = rng.randint(2, 5)
        combos.append("".join(rng.choice(fragments) for _ in range(k)))
    return base + runs + combos


POOL = _string_pool()
# Edge whitespace for the template's `trim` (Python str.strip: includes \x1c-\x1f, \x85, \u3000).
WHITESPACE = ["", " ", "  ", "\n", "\n\n", "\t", " \n\t ", "\u3000", "\r\n", "\x0b\x0c"]
WHITESPACE += ["\x1c\x1f", "\x85", "\u2028"]


def _conversations() -> list[tuple[list[dict], bool]]:
    rng = random.Random(5678)
    convs = []
    for i in range(50):
        messages = []
        for t in range(rng.randint(1, 5)):
            role = "user" if t % 2 == 0 else rng.choice(["assistant", "assistant", "model"])
            content = rng.choice(WHITESPACE) + rng.choice(POOL) + rng.choice(WHITESPACE)
            messages.append({"role": role, "content": content})
        convs.append((messages, i % 2 == 0))
    return convs


CONVERSATIONS = _conversations()

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    d = os.environ.get("GEMMA_JAX_TOKENIZER_DIR")
    if not d:
        pytest.skip("needs GEMMA_JAX_TOKENIZER_DIR (the real Gemma 2 tokenizer.model)")
    needed = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
    if not all(os.path.isfile(os.path.join(d, f)) for f in needed):
        pytest.skip(f"needs GEMMA_JAX_TOKENIZER_DIR with {', '.join(needed)} (the real Gemma 2 tokenizer; "
                    f"{d} lacks one)")
    return d


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(os.path.join(tokenizer_dir, "tokenizer.model"))


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def _hf_chat_ids(hf, messages, add_generation_prompt) -> list[int]:
    out = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(out, list):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _hf_comparable(s: str) -> bool:
    """Excludes the README's known, by-design differences from HF."""
    literal_specials = ("<bos>", "<eos>", "<pad>", "<unk>")
    return "\u2581" not in s and not any(t in s for t in literal_specials)


# --------------------------------------------------------------------------- plain encoding


def test_hf_loads_tokenizer_json(tokenizer_dir, hf):
    """Guard: HF must be reading tokenizer.json (its .model import mishandles tab runs)."""
    tokenizers = pytest.importorskip("tokenizers", reason="needs tokenizers (the test extra)")
    raw = tokenizers.Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    text = "\t\t\tdef f():\n\t\t\t\treturn 1" + "\t" * 33
    expected = raw.encode(text, add_special_tokens=False).ids
    assert hf(text, add_special_tokens=False)["input_ids"] == expected


def test_special_ids(tok):
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id) == (256000, 0, 1, 2)
    assert tok.token_id("<start_of_turn>") == 106
    assert tok.token_id("<end_of_turn>") == 107
    assert tok.token_id("<unk>") == 3
    assert tok.id_to_piece(106) == "<start_of_turn>"
    assert tok.id_to_piece(226) == "<0x09>"
    assert tok.stop_ids_for_chat() == (1, 107)
    with pytest.raises(TokenizerError, match="no_such_piece"):
        tok.token_id("<no_such_piece>")
    with pytest.raises(TokenizerError, match="256000"):
        tok.id_to_piece(256000)


@pytest.mark.parametrize("add_bos", [True, False])
def test_encode_matches_hf(tok, hf, add_bos):
    expected = hf(POOL, add_special_tokens=add_bos)["input_ids"]
    mismatches = [
        (s, ours, theirs)
        for s, theirs in zip(POOL, expected)
        if (ours := tok.encode(s, add_bos=add_bos)) != theirs
    ]
    assert len(POOL) >= 300
    assert mismatches == []


def test_encode_bos_eos(tok):
    assert tok.encode("") == [2]
    assert tok.encode("", add_bos=False) == []
    assert tok.encode("hi", add_eos=True)[0] == 2
    assert tok.encode("hi", add_eos=True)[-1] == 1
    assert tok.encode("\t") == [2, 226]
    with pytest.raises(TokenizerError, match="str"):
        tok.encode(b"bytes")


def test_decode_roundtrip_pool(tok):
    failures = [s for s in POOL if tok.decode(tok.encode(s, add_bos=False)) != s]
    assert failures == []


def test_decode_skips_control_ids(tok):
    ids = tok.encode("こんにちは 🇯🇵", add_eos=True)
    assert ids[0] == 2 and ids[-1] == 1
    assert tok.decode([0, 0] + ids) == "こんにちは 🇯🇵"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([5, -1])


# --------------------------------------------------------------------------- chat template


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_encode_chat_matches_hf(tok, hf, index):
    messages, gen = CONVERSATIONS[index]
    ids = tok.encode_chat(messages, add_generation_prompt=gen)
    assert ids == _hf_chat_ids(hf, messages, gen)
    assert render_chat(messages, gen) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=gen
    )
    assert ids[:2] == [2, 106] and ids.count(2) == 1  # exactly one BOS


def test_encode_chat_layout(tok):
    ids = tok.encode_chat([{"role": "user", "content": "  hi\t"}])
    assert ids == [2, 106, 1645, 108, 544, 107, 108, 106, 2516, 108]
    assert tok.decode(ids) == "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    no_prompt = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert no_prompt == ids[:7]


def test_render_chat_text():
    messages = [
        {"role": "user", "content": " Q? "},
        {"role": "assistant", "content": "A.\n"},
        {"role": "user", "content": "\u3000more"},
    ]
    assert render_chat(messages) == (
        "<bos><start_of_turn>user\nQ?<end_of_turn>\n<start_of_turn>model\nA.<end_of_turn>\n"
        "<start_of_turn>user\nmore<end_of_turn>\n<start_of_turn>model\n"
    )
    assert render_chat(messages, add_generation_prompt=False).endswith("more<end_of_turn>\n")


BAD_CHATS = {
    "system": (
        [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}],
        "system",
    ),
    "user_user": ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "altern"),
    "starts_assistant": ([{"role": "assistant", "content": "a"}], "alternate"),
    "empty": ([], "non-empty"),
    "unknown_role": ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "tool"),
    "content_not_str": ([{"role": "user", "content": ["a"]}], "content must be a str"),
    "role_not_str": ([{"role": ["user"], "content": "a"}], "unknown role"),
    "missing_content": ([{"role": "user"}], "'content'"),
    "not_a_list": ("hello", "non-empty list"),
    "late_system": (
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
        "system",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CHATS))
def test_render_chat_refusals(case):
    messages, needle = BAD_CHATS[case]
    with pytest.raises(TokenizerError, match=needle):
        render_chat(messages)


@pytest.mark.parametrize("case", sorted(BAD_CHATS))
def test_encode_chat_refusals(tok, case):
    messages, needle = BAD_CHATS[case]
    with pytest.raises(TokenizerError, match=needle):
        tok.encode_chat(messages)
    if case != "system":  # folding makes only the leading-system case valid
        with pytest.raises(TokenizerError, match=needle):
            tok.encode_chat(messages, fold_system=True)


@pytest.mark.parametrize("case", ["system", "user_user", "starts_assistant"])
def test_hf_template_refuses_too(hf, case):
    messages, _ = BAD_CHATS[case]
    with pytest.raises(Exception, match="(?i)system|alternate"):
        hf.apply_chat_template(messages, tokenize=False)


def test_fold_system(tok, hf):
    messages = [
        {"role": "system", "content": "  You answer in Japanese.\n"},
        {"role": "user", "content": "\nWhat is 2+2? "},
        {"role": "assistant", "content": "4です。"},
        {"role": "user", "content": "ありがとう"},
    ]
    folded = [{"role": "user", "content": "You answer in Japanese.\n\nWhat is 2+2?"}, *messages[2:]]
    for gen in (True, False):
        assert render_chat(messages, gen, fold_system=True) == hf.apply_chat_template(
            folded, tokenize=False, add_generation_prompt=gen
        )
        assert tok.encode_chat(messages, gen, fold_system=True) == _hf_chat_ids(hf, folded, gen)
    with pytest.raises(TokenizerError, match="followed by a user"):
        render_chat(messages[:1], fold_system=True)


# --------------------------------------------------------------------------- loading


def test_load_missing_path(tmp_path):
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(TokenizerError, match="not found") as info:
        Tokenizer.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00\xffnot a sentencepiece model\x13\x37" * 50, b'{"model": {"type": "BPE"}}'],
    ids=["empty", "garbage", "json"],
)
def test_load_not_sentencepiece(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="not a SentencePiece model") as info:
        Tokenizer.load(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_load_directory(tokenizer_dir):
    assert Tokenizer.load(tokenizer_dir).encode("hi") == [2, 544]


# --------------------------------------------------------------------------- properties

_JP = "あいうえおかきくけこさしすせそがぎぐアイウエオカキクケコヴァー日本語漢字東京学生時間々〆ー。、「」"
_EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "🇺🇸", "1️⃣", "🧑‍💻", "\u200d", "\ufe0f"]
_text_piece = st.one_of(
    st.characters(blacklist_categories=("Cs",)),
    st.sampled_from(list(_JP)),
    st.sampled_from(_EMOJI + [" ", "  ", "\t", "\n", "\n\n", " " * 33, "<start_of_turn>"]),
)
texts = st.lists(_text_piece, max_size=40).map("".join).filter(_hf_comparable)


@settings(deadline=None, max_examples=200)
@given(s=texts)
def test_roundtrip_and_hf_parity_property(tok, hf, s):
    ids = tok.encode(s, add_bos=False)
    assert tok.decode(ids) == s
    assert ids == hf(s, add_special_tokens=False)["input_ids"]


@st.composite
def conversations(draw):
    n = draw(st.integers(1, 5))
    assistant = st.sampled_from(["assistant", "model"])
    roles = ["user" if i % 2 == 0 else draw(assistant) for i in range(n)]
    return [{"role": r, "content": draw(texts)} for r in roles]


@settings(deadline=None, max_examples=50)
@given(messages=conversations(), gen=st.booleans())
def test_chat_property(tok, hf, messages, gen):
    assert tok.encode_chat(messages, add_generation_prompt=gen) == _hf_chat_ids(hf, messages, gen)
    assert render_chat(messages, gen) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=gen
    )
