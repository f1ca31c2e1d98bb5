"""eagle3-jax: EAGLE-3 speculative decoding in JAX (draft training and static-shape tree decoding)."""

__version__ = "0.1.0"
