"""Our own C++ kernels for XLA:CPU, shipped as source, compiled on first use with the system's C++
compiler into the user's cache directory, and called through XLA's typed FFI (`jax.ffi.ffi_call`).

build.py compiles and caches a shared library; int8.py is the int8 x int8 -> int32 product for
few rows (batch decode) that quant.dense uses on CPU.
"""
