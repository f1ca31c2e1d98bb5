"""The public API in eagle3_jax/__init__.py: every listed name resolves; unknown names fail clearly."""

import pytest

import eagle3_jax


def test_every_public_name_resolves():
  for name in eagle3_jax.__all__:
    assert getattr(eagle3_jax, name) is not None, name
  assert eagle3_jax.TreeConfig(top_k=2, depth=3, total_tokens=6).shape == "2x3x6"


def test_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    eagle3_jax.nope  # noqa: B018
