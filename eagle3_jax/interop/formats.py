"""config.json of each draft layout: parsing (with refusal of unimplemented variants) and writing, aux numbering."""

from __future__ import annotations

from typing import Any

from eagle3_jax.draft.head import DraftConfig

FORMAT_KEY = "eagle3_jax"  # our own config.json block: records the aux-layer numbering this file uses
FORMAT_VERSION = 1
# Copied through write -> read in every layout (in FORMAT_KEY where the layout has no field for them).
PORTABLE_EXTRA = ("verifier", "verifier_architectures", "speculative_tokens", "max_position_embeddings",
                  "bos_token_id", "eos_token_id", "pad_token_id")
DEFAULT_MAX_POSITION_EMBEDDINGS = 2048  # the official EAGLE-3 config's value (its training length)
DEFAULT_SPECULATIVE_TOKENS = 3


# ----- aux-layer numbering ------------------------------------------------------------------------------------


def default_aux_layer_ids(num_target_layers: int) -> tuple[int, ...]:
  """The official taps (2, L//2, L-3) in input numbering, clamped as LlamaConfig.aux_layer_ids clamps them."""
  L = num_target_layers
  return (min(2, L - 1), L // 2, max(L - 3, 0))


def aux_ids_from_output_numbering(ids) -> tuple[int, ...]:
  """SGLang / SpecForge / ModelOpt name the layer whose OUTPUT is tapped; that is the input of the next one."""
  return tuple(int(i) + 1 for i in ids)


def aux_ids_to_output_numbering(ids) -> tuple[int, ...]:
  if any(int(i) < 1 for i in ids):
    raise ValueError(f"aux layer ids {tuple(ids)} include input 0 (the embeddings), which output numbering "
                     "cannot express")
  return tuple(int(i) - 1 for i in ids)


def check_aux_ids(ids, field: str, num_target_layers: int | None) -> tuple[int, ...]:
  if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
    raise ValueError(f"config field {field} must be a list of ints, got {ids!r}")
  for i in ids:
    if i < 0 or (num_target_layers is not None and i > num_target_layers):  # L: the final hidden (speculators)
      raise ValueError(f"config field {field}: aux layer {i} (input numbering) is outside "
                       f"[0, {num_target_layers if num_target_layers is not None else 'L'}]")
  # Engines tap in layer order whatever order the list has (ModelOpt writes list(set(...))), so fc sees them sorted.
  return tuple(sorted(ids))


# ----- config parsing -----------------------------------------------------------------------------------------

# transformers' LlamaConfig defaults: what every engine assumes when a field is absent (speculators writes a diff).
_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
                   "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
# transformers' Qwen3Config defaults, for a Qwen3-style draft layer (q/k norm); head_dim is 128 whatever the width.
_QWEN3_DEFAULTS = _LLAMA_DEFAULTS | {"vocab_size": 151936, "intermediate_size": 22016, "max_position_embeddings": 32768,
                                     "head_dim": 128}
_LAYER_DEFAULTS = {None: _LLAMA_DEFAULTS, "llama": _LLAMA_DEFAULTS, "qwen3": _QWEN3_DEFAULTS}
# Variants of the head that change the math. True means a different network; refuse rather than mis-read.
REFUSED_FLAGS = {
    "use_aux_norm": "per-layer RMSNorm of the aux states before fc",
    "bias": "a bias on fc",
    "attention_bias": "biases on q/k/v/o",
    "mlp_bias": "biases in the MLP",
    "tie_word_embeddings": "lm_head tied to embed_tokens",
}
_EAGLE_ARCHS = ("LlamaForCausalLMEagle3", "LlamaForCausalLM", "Eagle3LlamaForCausalLM")
# The head variants DraftConfig implements, by the config field speculators, SpecForge and vLLM use for each.
VARIANT_FLAGS = ("norm_before_fc", "fc_norm", "norm_before_residual", "norm_output")
# What norm_output=true means in the official / SGLang layout depends on who wrote it: SpecForge 0.2.0 (where it is
# the default) applies the final norm before lm_head and feeds back the pre-norm hidden (plain EAGLE-3); SpecForge
# after its PR #879, SGLang and vLLM feed back the post-norm hidden (EAGLE 3.1). Our own files say which.
NORM_OUTPUT_FED_BACK = "post-norm hidden fed back (EAGLE 3.1)"
# What a reader may be told norm_output means in a file that does not say (read_draft(norm_output_means=...)):
# "eagle3.1" as SpecForge after #879, SGLang and vLLM read it; "final-norm" as SpecForge 0.2.0 wrote it.
NORM_OUTPUT_MEANINGS = ("eagle3.1", "final-norm")


def refuse(what: str, why: str) -> ValueError:
  return ValueError(f"{what}: {why}; eagle3_jax implements only the plain single-layer EAGLE-3 Llama head and "
                    "refuses this checkpoint rather than mis-reading it")


def _get(c: dict, key: str) -> Any:
  return c[key] if c.get(key) is not None else _LAYER_DEFAULTS.get(c.get("model_type"), _LLAMA_DEFAULTS).get(key)


def _refuse_flags(c: dict, where: str) -> None:
  for flag, meaning in REFUSED_FLAGS.items():
    if c.get(flag):
      raise refuse(f"{where}{flag}={c[flag]!r}", meaning)


def _flag(c: dict, key: str, where: str) -> bool:
  value = c.get(key)
  if value is not None and not isinstance(value, bool):
    raise ValueError(f"config field {where}{key} must be true or false, got {value!r}")
  return bool(value)


def _llama_shape(c: dict, where: str) -> dict[str, Any]:
  """Shape and numerics of the draft's decoder layer from a transformers LlamaConfig or Qwen3Config dict."""
  _refuse_flags(c, where)
  if c.get("model_type") not in _LAYER_DEFAULTS:
    raise refuse(f"{where}model_type={c['model_type']!r}", "only Llama- and Qwen3-style draft layers are implemented")
  num_layers = _get(c, "num_hidden_layers")
  if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
    raise ValueError(f"config field {where}num_hidden_layers must be an int >= 1, got {num_layers!r}")
  # speculators' trainer gives draft layers sliding-window attention by default (layer_types + sliding_window);
  # reading such a layer as full attention would silently change the draft past the window.
  layer_types = c.get("layer_types")
  window = None
  if layer_types is not None:
    # Every layer alike: full, or a window of one size (a per-layer mix is not implemented).
    if len(set(layer_types)) != 1 or layer_types[0] not in ("full_attention", "sliding_attention"):
      raise refuse(f"{where}layer_types={layer_types!r}", "attention other than full or one sliding window for "
                   "every layer")
    if layer_types[0] == "sliding_attention":
      window = c.get("sliding_window")
      if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"config field {where}layer_types says sliding_attention but {where}sliding_window is "
                         f"{window!r}, not a window size")
  elif c.get("sliding_window") is not None and c.get("use_sliding_window", True):
    # Without layer_types, speculators attends fully and other engines may apply the window: ambiguous.
    raise refuse(f"{where}sliding_window={c['sliding_window']!r} without layer_types",
                 "a window that engines disagree on applying")
  if _get(c, "hidden_act") != "silu":
    raise refuse(f"{where}hidden_act={_get(c, 'hidden_act')!r}", "only SiLU-gated MLPs are implemented")
  # transformers >= 5 nests theta (and the scaling type) in rope_parameters; older files use rope_scaling.
  rope = c.get("rope_parameters") or {}
  for name in ("rope_parameters", "rope_scaling"):
    scaling = c.get(name) or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
      raise refuse(f"{where}{name}={scaling!r}", "DraftConfig has no scaled RoPE")
  D, N = _get(c, "hidden_size"), _get(c, "num_attention_heads")
  return {"hidden_size": D, "intermediate_size": _get(c, "intermediate_size"), "num_heads": N,
          "num_kv_heads": c.get("num_key_value_heads") or N, "head_dim": _get(c, "head_dim") or D // N,
          "qk_norm": c.get("model_type") == "qwen3", "sliding_window": window, "num_layers": num_layers,
          "vocab_size": _get(c, "vocab_size"), "rms_norm_eps": float(_get(c, "rms_norm_eps")),
          "rope_theta": float(rope.get("rope_theta") or _get(c, "rope_theta"))}


def _aux_from_sources(sources: list[tuple[str, tuple[int, ...]]], num_target_layers: int | None,
                      missing_hint: str) -> tuple[tuple[int, ...], str]:
  """Picks the aux ids (input numbering) from every field that states them; they must agree."""
  if not sources:
    if num_target_layers is None:
      raise ValueError(f"config.json states no aux layer ids ({missing_hint}); pass num_target_layers=L (the "
                       "target's num_hidden_layers) to use the official default (2, L//2, L-3)")
    return default_aux_layer_ids(num_target_layers), "default"
  checked = [(field, check_aux_ids(ids, field, num_target_layers)) for field, ids in sources]
  for field, ids in checked[1:]:
    if ids != checked[0][1]:
      raise ValueError(f"aux layer ids disagree: {checked[0][0]} gives {checked[0][1]} but {field} gives {ids} "
                       "(both shown in input numbering)")
  return checked[0][1], checked[0][0]


def own_block(config: dict) -> dict:
  own = config.get(FORMAT_KEY) or {}
  if own and own.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"config field {FORMAT_KEY}.format_version={own.get('format_version')!r} is not "
                     f"{FORMAT_VERSION}")
  return own


def _norm_output(config: dict, own: dict, means: str | None) -> bool:
  """DraftConfig.norm_output of an official-layout file that has the field: its meaning depends on the writer."""
  value = _flag(config, "norm_output", "")
  if means is not None and means not in NORM_OUTPUT_MEANINGS:
    raise ValueError(f"norm_output_means={means!r} is not one of {NORM_OUTPUT_MEANINGS}")
  if own.get("norm_output") == NORM_OUTPUT_FED_BACK:
    if means == "final-norm":
      raise ValueError(f"norm_output_means='final-norm' contradicts the file's own {FORMAT_KEY}.norm_output "
                       f"({NORM_OUTPUT_FED_BACK!r})")
    means = "eagle3.1"
  if means == "eagle3.1":
    return value
  if means == "final-norm":  # SpecForge 0.2.0: true is plain EAGLE-3 (final norm, pre-norm hidden fed back)
    if not value:
      raise refuse("norm_output=false read as SpecForge 0.2.0 wrote it", "a draft without the final norm before "
                   "lm_head")
    return False
  raise refuse(f"norm_output={config['norm_output']!r} in the official / SGLang layout",
               "SpecForge 0.2.0 wrote it for a final norm before lm_head with the pre-norm hidden fed back "
               "(plain EAGLE-3; false: no final norm), SpecForge after #879 and vLLM read true as the post-norm "
               "hidden fed back (EAGLE 3.1); the file does not say which. Say it: read_draft(norm_output_means="
               "'eagle3.1' or 'final-norm'), or `convert --norm-output-means ...`")


def parse_eagle(config: dict, num_target_layers: int | None,
                norm_output_means: str | None = None) -> tuple[dict, tuple[int, ...], dict]:
  archs = config.get("architectures") or []
  if any(a not in _EAGLE_ARCHS for a in archs):
    raise refuse(f"architectures={archs}", f"not one of {_EAGLE_ARCHS}")
  shape = _llama_shape(config, "")
  if shape["num_layers"] != 1:
    raise refuse(f"num_hidden_layers={shape['num_layers']} in the official / SGLang layout",
                 "multi-layer drafts (only the speculators layout names layers 1..N-1 for every engine)")
  if shape["sliding_window"] is not None:  # SGLang's and the official loaders attend fully whatever it says
    raise refuse(f"layer_types={config.get('layer_types')!r} in the official / SGLang layout",
                 "sliding-window draft attention (only the speculators layout states it for every engine)")
  ec = config.get("eagle_config") or {}
  _refuse_flags(ec, "eagle_config.")
  for key, bad, meaning in (("use_aux_hidden_state", False, "an EAGLE-1/2 head (no aux states)"),
                            ("use_input_layernorm_in_first_layer", False, "no input_layernorm on the embedding"),
                            ("use_last_layernorm", False, "no final norm before lm_head"),
                            ("use_mtp_layernorm", True, "extra MTP layernorms")):
    if key in ec and bool(ec[key]) == bad:
      raise refuse(f"eagle_config.{key}={ec[key]!r}", meaning)
  if (ec.get("parallel_draft_step") or 1) > 1:
    raise refuse(f"eagle_config.parallel_draft_step={ec['parallel_draft_step']}", "parallel drafting")
  sources = []
  if ec.get("eagle_aux_hidden_state_layer_ids"):
    sources.append(("eagle_config.eagle_aux_hidden_state_layer_ids (output numbering)",
                    aux_ids_from_output_numbering(check_aux_ids(ec["eagle_aux_hidden_state_layer_ids"],
                                                                 "eagle_config.eagle_aux_hidden_state_layer_ids",
                                                                 None))))
  if config.get("eagle_aux_hidden_state_layer_ids"):  # vLLM reads this top-level field as input numbering
    sources.append(("eagle_aux_hidden_state_layer_ids (input numbering)", config["eagle_aux_hidden_state_layer_ids"]))
  own = own_block(config)
  if own.get("aux_layer_ids_input_numbering"):
    sources.append((f"{FORMAT_KEY}.aux_layer_ids_input_numbering", own["aux_layer_ids_input_numbering"]))
  aux, field = _aux_from_sources(sources, num_target_layers, "no eagle_config.eagle_aux_hidden_state_layer_ids")
  extra = {"aux_ids_field": field}
  # vLLM reads norm_before_fc from eagle_config first, then the top level; the other flags from the top level.
  variants = {"norm_before_fc": _flag(ec, "norm_before_fc", "eagle_config.") or _flag(config, "norm_before_fc", ""),
              "fc_norm": _flag(config, "fc_norm", ""),
              "norm_before_residual": _flag(config, "norm_before_residual", "")}
  if "norm_output" in config:
    variants["norm_output"] = _norm_output(config, own, norm_output_means)
  shape.update(variants)
  return shape, aux, extra


def parse_speculators(config: dict, num_target_layers: int | None) -> tuple[dict, tuple[int, ...], dict]:
  if config.get("speculators_model_type") != "eagle3":
    raise refuse(f"speculators_model_type={config.get('speculators_model_type')!r}", "not an eagle3 speculator")
  if "norm_before_residual" not in config:
    # vLLM defaults the missing field to true; speculators itself always writes it.
    raise refuse("speculators config without norm_before_residual", "vLLM serves that as norm_before_residual=true")
  layer_cfg = config.get("transformer_layer_config")
  if not isinstance(layer_cfg, dict):
    raise ValueError("speculators config.json has no transformer_layer_config object")
  shape = _llama_shape(layer_cfg, "transformer_layer_config.")
  sources = []
  if config.get("eagle_aux_hidden_state_layer_ids"):
    sources.append(("eagle_aux_hidden_state_layer_ids (input numbering)", config["eagle_aux_hidden_state_layer_ids"]))
  own = own_block(config)
  if own.get("aux_layer_ids_input_numbering"):
    sources.append((f"{FORMAT_KEY}.aux_layer_ids_input_numbering", own["aux_layer_ids_input_numbering"]))
  aux, field = _aux_from_sources(sources, num_target_layers, "no eagle_aux_hidden_state_layer_ids")
  spec = config.get("speculators_config") or {}
  verifier = spec.get("verifier") or {}
  methods = spec.get("proposal_methods") or [{}]
  extra = {"aux_ids_field": field, "verifier": verifier.get("name_or_path"),
           "verifier_architectures": list(verifier.get("architectures") or []),
           "speculative_tokens": methods[0].get("speculative_tokens")}
  for key in ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
    extra[key] = layer_cfg.get(key)
  shape.update({k: _flag(config, k, "") for k in VARIANT_FLAGS})
  return shape, aux, extra


# ----- writing ------------------------------------------------------------------------------------------------


def _llama_fields(cfg: DraftConfig, extra: dict, torch_dtype: str) -> dict[str, Any]:
  """A complete transformers LlamaConfig (Qwen3Config with qk_norm) for the draft layer: every field engines read,
  nothing left to defaults, model_type first."""
  window = cfg.sliding_window
  # Stated whenever the layer is not a plain Llama one: Qwen3Config would otherwise fill in its own window fields.
  attention = {"layer_types": ["sliding_attention" if window else "full_attention"] * cfg.num_layers,
               "sliding_window": window, "use_sliding_window": window is not None} if window or cfg.qk_norm else {}
  qwen3 = {"max_window_layers": cfg.num_layers} if cfg.qk_norm else {}
  fields = {"model_type": "qwen3" if cfg.qk_norm else "llama", **qwen3, **attention,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "num_hidden_layers": cfg.num_layers, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta, "rope_scaling": None,
            "max_position_embeddings": extra.get("max_position_embeddings", DEFAULT_MAX_POSITION_EMBEDDINGS),
            "vocab_size": cfg.vocab_size, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "pretraining_tp": 1, "initializer_range": 0.02, "use_cache": True,
            "dtype": torch_dtype, "torch_dtype": torch_dtype}  # transformers >= 4.56 reads dtype; older torch_dtype
  fields.update({k: extra[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in extra})
  return fields


def _own(layout: str, aux: tuple[int, ...], extra: dict) -> dict[str, Any]:
  return {"format_version": FORMAT_VERSION, "layout": layout,
          "aux_layer_numbering": "output" if layout == "eagle" else "input",
          "aux_layer_ids_input_numbering": list(aux), **{k: extra[k] for k in PORTABLE_EXTRA if k in extra}}


def eagle_config(cfg: DraftConfig, aux: tuple[int, ...], extra: dict, torch_dtype: str) -> dict[str, Any]:
  """Official / SGLang config.json: LlamaForCausalLMEagle3 with aux ids in eagle_config, OUTPUT numbering."""
  missing = [what for what, used in (("Qwen3-style (qk_norm)", cfg.qk_norm),
                                     ("sliding-window", cfg.sliding_window is not None),
                                     ("multi-layer", cfg.num_layers > 1)) if used]
  if missing:
    raise ValueError(f"the official EAGLE-3 layout has no {' / '.join(missing)} draft: write the speculators "
                     "layout instead")
  config = {"architectures": ["LlamaForCausalLMEagle3"], **_llama_fields(cfg, extra, torch_dtype),
            "draft_vocab_size": cfg.draft_vocab_size}
  if cfg.target_hidden_size != cfg.hidden_size:
    # Only when needed: the official loader takes the mere presence of this field to mean "own embedding".
    config["target_hidden_size"] = cfg.target_hidden_size
  config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux_ids_to_output_numbering(aux)),
                            "use_aux_hidden_state": True}
  # Variant flags only when set, so a plain EAGLE-3 file stays exactly what the official loader expects; where vLLM
  # and SpecForge read them (fc_norm as SpecForge writes it, norm_before_fc inside eagle_config as vLLM reads first).
  if cfg.norm_before_fc:
    config["eagle_config"]["norm_before_fc"] = True
  for key in ("fc_norm", "norm_before_residual", "norm_output"):
    if getattr(cfg, key):
      config[key] = True
  config[FORMAT_KEY] = _own("eagle", aux, extra)
  if cfg.norm_output:
    config[FORMAT_KEY]["norm_output"] = NORM_OUTPUT_FED_BACK
  return config


def speculators_config(cfg: DraftConfig, aux: tuple[int, ...], extra: dict, torch_dtype: str) -> dict[str, Any]:
  """speculators config.json (what `vllm serve DIR` needs): top-level aux ids in INPUT numbering."""
  if not extra.get("verifier"):
    raise ValueError("the speculators layout names its verifier: pass verifier=... (the target's HF id or path)")
  proposal = {"proposal_type": "greedy",
              "speculative_tokens": extra.get("speculative_tokens", DEFAULT_SPECULATIVE_TOKENS),
              "verifier_accept_k": 1, "accept_tolerance": 0.0}
  return {
      "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
      "transformer_layer_config": _llama_fields(cfg, extra, torch_dtype),
      "draft_vocab_size": cfg.draft_vocab_size,
      "target_hidden_size": cfg.target_hidden_size if cfg.target_hidden_size != cfg.hidden_size else None,
      "eagle_aux_hidden_state_layer_ids": list(aux),
      # Written explicitly: vLLM treats a missing norm_before_residual as true.
      **{k: bool(getattr(cfg, k)) for k in VARIANT_FLAGS},
      "embed_requires_grad": False, "dtype": torch_dtype, "torch_dtype": torch_dtype,
      "speculators_config": {"algorithm": "eagle3", "proposal_methods": [proposal], "default_proposal_method": "greedy",
                             "verifier": {"name_or_path": extra["verifier"],
                                          "architectures": list(extra.get("verifier_architectures", []))}},
      FORMAT_KEY: _own("speculators", aux, extra),
  }
