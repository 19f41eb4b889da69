"""The CPU model and the instruction sets that decide which kernels are fast (printed with every
benchmark figure: the ranking of float32, bfloat16 and int8 products depends on them)."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# What each /proc/cpuinfo flag means for us, in the order printed.
ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
             "avx512_bf16": "AVX512-BF16", "amx_tile": "AMX", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16"}


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """{"model": name, "cores": n, "isa": {label: bool}} from /proc/cpuinfo (Linux); elsewhere the
    model from platform and no ISA flags."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in (platform.processor(), platform.machine()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    return {"model": model, "cores": os.cpu_count(),
            "isa": {label: flag in flags for flag, label in ISA_FLAGS.items()} if flags else {}}


def describe() -> str:
    """One line: 'CPU: <model>, <n> cores; AVX2 yes, AVX-512 yes, ... AMX no'."""
    info = cpu_info()
    isa = ", ".join(f"{label} {'yes' if on else 'no'}" for label, on in info["isa"].items()) or "ISA flags unknown"
    return f"CPU: {info['model']}, {info['cores']} cores; {isa}"
