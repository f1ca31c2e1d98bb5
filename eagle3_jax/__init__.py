"""eagle3-jax: EAGLE-3 speculative decoding in JAX (draft training and static-shape tree decoding).

The public API, grouped by concept. Names resolve on first use (PEP 562), so `import eagle3_jax` stays cheap and
a config file that imports `eagle3_jax.config` does not pull in JAX models it never uses.
"""

import importlib

__version__ = "0.1.0"

_API = {
    # the target: the protocol every target goes through, the bundled Llama family, loading
    "Target": "eagle3_jax.target.protocol",
    "llama_target": "eagle3_jax.target.protocol",
    "load_target": "eagle3_jax.target.load",
    "load_tokenizer": "eagle3_jax.target.load",
    # the draft: its configuration, parameters and vocabulary
    "DraftConfig": "eagle3_jax.config",
    "DraftVocab": "eagle3_jax.draft.vocab",
    "init_draft": ("eagle3_jax.draft.head", "init_params"),
    # decoding: tree shape, sampling, speculative generation
    "TreeConfig": "eagle3_jax.config",
    "SamplingConfig": "eagle3_jax.config",
    "SpecConfig": "eagle3_jax.config",
    "speculative_generate": ("eagle3_jax.decode.speculative", "generate"),
    "speculative_outputs": ("eagle3_jax.decode.speculative", "outputs"),
    # drafts on disk, in the peers' layouts
    "read_draft": "eagle3_jax.interop",
    "write_draft": "eagle3_jax.interop",
    # configuration files (configs/*.py)
    "load_config": "eagle3_jax.config",
}

__all__ = sorted(_API)


def __getattr__(name: str):
  if name not in _API:
    raise AttributeError(f"module 'eagle3_jax' has no attribute {name!r}")
  module, attr = _API[name] if isinstance(_API[name], tuple) else (_API[name], name)
  return getattr(importlib.import_module(module), attr)


def __dir__():
  return sorted(list(globals()) + __all__)
