"""Test machinery: makes bitsandbytes take the CPU path HPCTRAIN_TEST_BNB_AVX512BF16 names
(1: the AVX-512 BF16 path that repacks 4-bit weights, 0: the plain one) in every process
started with this folder on PYTHONPATH (the launcher, torchrun and each rank), whatever the CPU.

bitsandbytes decides per `Linear4bit` at construction from `has_avx512bf16()`, which
`bitsandbytes.nn.modules` imports by name: replacing that name once the module has loaded
decides every layer built after it. Its kernels' registration is left to the real CPU.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_FORCED = os.environ.get("HPCTRAIN_TEST_BNB_AVX512BF16")
_TARGET = "bitsandbytes.nn.modules"


class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: _FORCED == "1"

        spec.loader.exec_module = exec_module
        return spec


if _FORCED in ("0", "1"):
    sys.meta_path.insert(0, _Patch())
