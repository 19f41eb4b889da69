import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

_MEASURED: list[tuple[str, str]] = []


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory):
    """A converted tiny model with the real Gemma 2 tokenizer (vocab 256000, hidden size 8, one
    layer, max_position_embeddings 64): cheap to compile, a context that fills in a few turns."""
    from hf_oracle import with_real_tokenizer
    return with_real_tokenizer(tmp_path_factory.mktemp("chat_ckpt"), seed=1, hidden_size=8, intermediate_size=8,
                               num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                               query_pre_attn_scalar=8)


@pytest.fixture
def report():
    """report(name, value): a measured figure, printed in pytest's terminal summary."""
    def add(name: str, value) -> None:
        _MEASURED.append((name, value if isinstance(value, str) else f"{value:.3g}"))
    return add


def pytest_terminal_summary(terminalreporter):
    if _MEASURED:
        terminalreporter.section("measured")
        for name, value in _MEASURED:
            terminalreporter.write_line(f"{name}: {value}")
