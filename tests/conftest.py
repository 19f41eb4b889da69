import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

_MEASURED: list[tuple[str, str]] = []


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
