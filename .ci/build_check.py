"""Is the installed llama-cpp-python built as CMAKE_ARGS asked? (pip's wheel cache ignores CMAKE_ARGS.)

    python .ci/build_check.py "-DGGML_RPC=on -DCMAKE_CXX_FLAGS=-mno-amx-int8"

Exit 0 when every capability the arguments ask for is in the build (RPC, GPU offload) and AMX is absent where
they turn it off; exit 1 with one line naming the difference, so `make install` rebuilds without the cache.
"""

from __future__ import annotations

import sys

import llama_cpp

args = sys.argv[1] if len(sys.argv) > 1 else ""
info = llama_cpp.llama_print_system_info().decode()
wrong = []
if "-DGGML_RPC=on" in args and not llama_cpp.llama_supports_rpc():
    wrong.append("asked for the RPC backend, the installed build has none")
if (
    any(f"-DGGML_{b}=on" in args for b in ("CUDA", "HIP", "VULKAN", "METAL", "SYCL"))
    and not llama_cpp.llama_supports_gpu_offload()
):
    wrong.append("asked for a GPU backend, the installed build cannot offload")
if "-mno-amx-int8" in args and "AMX_INT8 = 1" in info:
    wrong.append("asked for no AMX kernels, the installed build has them")
if wrong:
    print("llama-cpp-python: " + "; ".join(wrong) + " (a cached wheel built otherwise): rebuilding", file=sys.stderr)
sys.exit(1 if wrong else 0)
