"""Test setup: 8 fake CPU devices (set before JAX touches a device) and shared tiny configs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

from eagle3_jax.config import LlamaConfig  # noqa: E402


@pytest.fixture
def tiny_cfg() -> LlamaConfig:
  return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4,
                     num_kv_heads=2, head_dim=16, rope_theta=10000.0)


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
  """Drops every compiled executable after each test module. XLA:CPU maps memory for each one, and the whole suite
  in one process came near vm.max_map_count (65530 here): it crashed inside an XLA compile in test_speculative."""
  yield
  jax.clear_caches()
