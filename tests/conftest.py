"""Test set-up: 8 fake CPU devices for the sharding tests; a shared persistent compilation cache.

Many tests compile the same tiny programs (and the CLI tests start subprocesses that compile them again);
XLA:CPU compiles dominate the suite's time, so compiled programs are cached on disk for the whole run. The
cache key covers the program, the flags and the jax version, so a stale entry is never used.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dtvit-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
