"""Decoding: vanilla (the baseline), the draft tree, acceptance, speculative rounds, the host engine, tree choice."""
