"""Test-wide settings: CPU only, no network, fp32 matmuls, fast compiles, 8 simulated devices for
mesh tests."""
import os

# The tests' models are tiny, so compiling is most of their time: XLA is told to compile fast rather
# than to emit fast code (LLVM at optimisation level 0), here and in the processes tests start
# (tests/processes.py keeps these flags). The programs are the same HLO; only their machine code
# is less optimised.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The persistent compilation cache, as `python -m p3o_jax.main` uses it: the xdist workers and
# the subprocess tests load what another process already compiled.
from p3o_jax import compile_cache  # noqa: E402

compile_cache.enable()
