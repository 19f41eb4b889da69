"""Compile a kernel's C++ source into a shared library, once per source, jaxlib and compiler.

The library lives in `<cache_root>/kernels/NAME-<hash>.so`, the hash covering the sources, the
flags, the jaxlib version (its FFI headers) and the compiler's own version line, so a change of
any of them compiles anew. The compiler writes into a temporary file in the same directory that
is renamed into place once complete: two processes compiling at once both succeed (the second
rename replaces an identical file), and a process killed while compiling leaves no half-written
library under the final name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-math-errno", "-w")
COMPILE_TIMEOUT_S = 300


class BuildError(Exception):
    """The kernel could not be compiled here (no compiler, or it failed); the message says why."""


def find_compiler() -> str:
    """$CXX if set, else the first of c++, g++, clang++ on PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise BuildError(f"no C++ compiler found (tried {', '.join(names)}; set CXX to choose one)")


def _version_line(compiler: str) -> str:
    try:
        run = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{compiler} --version failed: {e}") from None
    if run.returncode:
        raise BuildError(f"{compiler} --version failed: {run.stderr.strip()[:200]}")
    return run.stdout.splitlines()[0] if run.stdout else ""


def library(name: str, sources: list[Path], cache_dir: Path) -> Path:
    """The compiled library for sources (the first is the translation unit, the others files it
    includes), compiling it into cache_dir if it is not there yet."""
    import jax
    import jaxlib

    compiler = find_compiler()
    include = jax.ffi.include_dir()
    digest = hashlib.sha256()
    for part in (compiler, _version_line(compiler), jaxlib.__version__, " ".join(FLAGS)):
        digest.update(part.encode() + b"\0")
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    out = cache_dir / f"{name}-{digest.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=cache_dir)
        os.close(fd)
    except OSError as e:
        raise BuildError(f"cannot write to {cache_dir}: {e}") from None
    cmd = [compiler, *FLAGS, f"-I{include}", f"-I{sources[0].parent}", str(sources[0]), "-o", tmp]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if run.returncode:
            lines = [line for line in run.stderr.splitlines() if "error" in line] or run.stderr.splitlines()
            raise BuildError(f"{Path(compiler).name} failed on {sources[0].name}: {lines[0].strip() if lines else 'no output'}")
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{Path(compiler).name} could not run: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
