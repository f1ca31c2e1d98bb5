"""Building blocks shared by target and draft: norms, RoPE, the MLP, attention and masks."""
