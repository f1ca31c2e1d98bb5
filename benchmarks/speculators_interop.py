"""Interop check against vLLM's `speculators` library (v0.9.x): our speculators-layout drafts load there and compute
the same draft logits, and drafts speculators saves load here. A manual script, not a test (not run in CI).

For a tiny random 4-layer Llama verifier (saved to a temp dir, which is its name_or_path; no network needed) and each
head variant (canonical, norm_before_fc, fc_norm, norm_before_residual, EAGLE 3.1 = fc_norm + norm_output, and
speculators' training default = norm_before_residual + norm_before_fc + norm_output, a Qwen3-style layer (qk_norm)
alone and with that default, a sliding-window layer whose window cuts the 128 tokens, 3 layers, and 2 windowed
Qwen3-style layers with speculators' defaults; Vd = 64, plus one full-vocab
canonical case with a non-default rope_theta) it:
  1. writes a random draft with `interop.write_draft(layout="speculators", target_embed=<verifier embedding>)`;
  2. loads it with `Eagle3SpeculatorConfig.from_pretrained` (config ok) and `Eagle3DraftModel.from_pretrained`, and
     checks every file tensor landed in the model under the same key and no draft weight was left unloaded
     (tensors ok), embed_tokens == the verifier's (embed ok), flags / aux ids / d2t / t2d (flags ok);
  3. compares draft-vocab logits of speculators' `forward` (captured from lm_head) with ours, for TTT step 1 and
     step 2 (step 2: the step-1 hidden fed back, next tokens, positions + 1, keys of both steps, through our TTT
     attention; this is where norm_output's feed-back semantics and the training window's row counting show);
  4. `save_pretrained`s the speculators model and reads it back with `interop.read_draft` (all tensors exact);
  5. for two variants, runs `python -m eagle3_jax.convert SRC DST --to speculators --target <verifier>` on an
     eagle-layout export and loads DST with speculators (config + logits).

Setup (never in the main environment; torch / transformers come from the system site packages):
  python -m venv --system-site-packages /work/venv-spec
  /work/venv-spec/bin/pip install --no-deps speculators loguru hs-connectors
  cd /work/main && /work/venv-spec/bin/python benchmarks/speculators_interop.py
Modules speculators imports but does not need here (openai, and hs_connectors / loguru when not installed) are
replaced by stand-ins in sys.modules; the report's first lines say which.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import types
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_num_threads(1)
torch.manual_seed(0)


def _module(name: str) -> types.ModuleType:
  """A package whose every attribute is a dummy class that refuses to be instantiated."""
  def attribute(attr: str):
    if attr.startswith("__"):
      raise AttributeError(attr)  # inspect probes dunders: keep the module looking ordinary

    def fail(self, *a, **k):
      raise RuntimeError(f"{name}.{attr} is a stand-in (not installed)")
    return type(attr, (), {"__init__": fail})
  mod = types.ModuleType(name)
  mod.__path__, mod.__getattr__ = [], attribute
  return mod


def _stand_in(name: str, *submodules: str) -> bool:
  """Registers stand-ins for a module speculators imports but this check never uses, when it is not installed."""
  try:
    importlib.import_module(name)
    return False
  except ImportError:
    for full in (name, *(f"{name}.{s}" for s in submodules)):
      sys.modules[full] = _module(full)
    return True


STAND_INS = [m for m, *subs in (("openai", "types", "types.chat", "types.completion"), ("hs_connectors",),
                                ("loguru",)) if _stand_in(m, *subs)]
if "loguru" in STAND_INS:
  import logging
  sys.modules["loguru"].logger = logging.getLogger("loguru-stand-in")
else:
  import loguru
  loguru.logger.remove()  # speculators logs every verifier file it opens
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig  # noqa: E402

from eagle3_jax import interop  # noqa: E402
from eagle3_jax.draft import head as draft  # noqa: E402
from eagle3_jax.draft.head import DraftConfig  # noqa: E402
from eagle3_jax.draft.vocab import DraftVocab  # noqa: E402
from eagle3_jax.interop.formats import FORMAT_KEY, VARIANT_FLAGS  # noqa: E402
from eagle3_jax.nn import attention, masks  # noqa: E402

D, V, L, AUX = 64, 256, 4, (1, 2, 3)
T = 128  # one flex-attention block: speculators builds its BlockMask for whole 128-token blocks
VARIANTS = [  # (name, flags, draft_vocab_size, extra DraftConfig fields)
    ("canonical", {}, 64, {}),
    ("canonical full-vocab theta=5e5", {}, 256, {"rope_theta": 5e5}),
    ("norm_before_fc", {"norm_before_fc": True}, 64, {}),
    ("fc_norm", {"fc_norm": True}, 64, {}),
    ("norm_before_residual", {"norm_before_residual": True}, 64, {}),
    ("eagle3.1 (fc_norm+norm_output)", {"fc_norm": True, "norm_output": True}, 64, {}),
    ("speculators default (nbr+nbf+norm_output)",
     {"norm_before_residual": True, "norm_before_fc": True, "norm_output": True}, 64, {}),
    ("qwen3 layer (qk_norm)", {}, 64, {"qk_norm": True}),
    ("sliding window 48 (< T = 128: the window cuts)", {}, 64, {"sliding_window": 48}),
    ("3 layers", {}, 64, {"num_layers": 3}),
    ("2 qwen3 layers, window 48, speculators default flags",
     {"norm_before_residual": True, "norm_before_fc": True, "norm_output": True}, 64,
     {"qk_norm": True, "sliding_window": 48, "num_layers": 2}),
    ("qwen3 speculators default (qk_norm+nbr+nbf+norm_output)",
     {"norm_before_residual": True, "norm_before_fc": True, "norm_output": True}, 64, {"qk_norm": True}),
]
CONVERT_VARIANTS = ("eagle3.1 (fc_norm+norm_output)", "speculators default (nbr+nbf+norm_output)")
IGNORED_MODEL_KEYS = ("verifier_lm_head.weight", "verifier_norm.weight")  # filled from the verifier by design


def make_verifier(path: pathlib.Path) -> np.ndarray:
  cfg = transformers.LlamaConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16, intermediate_size=128, vocab_size=V, max_position_embeddings=256,
                                 tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg)
  model.save_pretrained(path)
  return model.model.embed_tokens.weight.detach().numpy().copy()


def make_ckpt(flags: dict, vd: int, extra: dict, seed: int) -> interop.DraftCheckpoint:
  cfg = DraftConfig(hidden_size=D, target_hidden_size=D, intermediate_size=128, num_heads=4, num_kv_heads=2,
                    head_dim=16, vocab_size=V, draft_vocab_size=vd, **flags, **extra)
  key = jax.random.PRNGKey(seed)
  params = draft.init_params(cfg, key)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  # Norm gains around 1, matrices at ~1/sqrt(fan_in): no leaf stays at its init value and activations stay O(1).
  leaves = [np.asarray(x + (0.2 if x.ndim == 1 else x.shape[0] ** -0.5) * jax.random.normal(k, x.shape))
            for x, k in zip(leaves, keys)]
  ids = np.sort(np.random.default_rng(seed).choice(V, vd, replace=False))
  return interop.DraftCheckpoint(cfg=cfg, params=jax.tree.unflatten(tree, leaves), vocab=DraftVocab.from_ids(ids, V),
                                 aux_layer_ids=AUX)


def our_logits(ckpt, embed, tokens, aux):
  """Draft-vocab logits of TTT steps 1 and 2 as speculators' training forward runs them (teacher-forced step 2):
  step 1 through draft.forward and its cache, step 2 through the TTT attention our trainer uses (for a
  sliding-window layer, the window counts rows, as speculators' training mask does)."""
  cfg, p = ckpt.cfg, jax.tree.map(jnp.asarray, ckpt.params)
  pos = jnp.arange(T)[None]
  cache = draft.init_cache(cfg, 1, T)
  hidden = draft.fuse(p, aux, cfg=cfg)
  out1, _ = draft.forward(p, embed[tokens], hidden, pos, cache, masks.causal_mask(jnp.full((1,), T), T), cfg=cfg)
  tokens2 = jnp.concatenate([tokens[:, 1:], jnp.zeros((1, 1), tokens.dtype)], axis=1)
  kv: dict[int, list] = {}  # per layer: (k, v) of step 1, then of step 2

  def attend(step):
    def f(i, q, k, v):
      kv.setdefault(i, []).append((k, v))
      if step == 0:
        return attention.attention(q, attention.head_major(k), attention.head_major(v),
                                   masks.sliding_window(masks.causal_mask(jnp.full((1,), T), T), pos, pos,
                                                        cfg.sliding_window))
      ks, vs = zip(*kv[i])
      return attention.ttt_attention(q, jnp.stack(ks), jnp.stack(vs), 1, cfg.sliding_window)
    return f

  draft.run_layers(p, embed[tokens], hidden, pos, attend(0), cfg=cfg)  # step 1 again: each layer's keys
  out2 = draft.run_layers(p, embed[tokens2], out1, pos + 1, attend(1), cfg=cfg)
  return [np.asarray(draft.logits(p, o, cfg=cfg)) for o in (out1, out2)]


def spec_logits(model, tokens, aux):
  got = []
  hook = model.lm_head.register_forward_hook(lambda m, i, o: got.append(o.detach().numpy()))
  with torch.no_grad():
    model(hidden_states=torch.from_numpy(np.asarray(aux)), input_ids=torch.from_numpy(np.asarray(tokens)),
          document_ids=torch.zeros((1, T), dtype=torch.long), position_ids=torch.arange(T)[None], ttt_steps=2)
  hook.remove()
  return got


def check_loaded(model, ckpt, out_dir, embed, tokens, aux) -> list[str]:
  """tensors / embed / flags / logits of a speculators model loaded from out_dir vs. our checkpoint."""
  notes, cfg = [], ckpt.cfg
  from safetensors.numpy import load_file
  file = load_file(str(out_dir / "model.safetensors"))
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  bad = [k for k, v in file.items() if k not in sd or sd[k].shape != v.shape or not np.array_equal(sd[k], v)]
  unloaded = sorted(set(sd) - set(file) - set(IGNORED_MODEL_KEYS))
  notes.append("tensors ok" if not bad and not unloaded else
               f"TENSORS DIFFER: not loaded as written {bad}; model keys absent from file (left at init) {unloaded}")
  notes.append("embed ok" if np.array_equal(sd["embed_tokens.weight"], embed) else "EMBED DIFFERS")
  c = model.config
  want = {**{k: getattr(cfg, k) for k in VARIANT_FLAGS}, "aux ids": list(AUX), "draft_vocab_size":
          cfg.draft_vocab_size, "input_norm": cfg.norm_before_fc, "fc_norm modules": cfg.fc_norm,
          "layer.norm_before_residual": cfg.norm_before_residual}
  have = {**{k: getattr(c, k) for k in VARIANT_FLAGS}, "aux ids": c.eagle_aux_hidden_state_layer_ids,
          "draft_vocab_size": c.draft_vocab_size, "input_norm": model.input_norm is not None,
          "fc_norm modules": model.fc_norm is not None,
          "layer.norm_before_residual": model.layers[0].norm_before_residual}
  if cfg.draft_vocab_size != V:
    want["d2t"], have["d2t"] = np.asarray(ckpt.vocab.d2t).tolist(), model.d2t.tolist()
    want["t2d"], have["t2d"] = np.asarray(ckpt.vocab.t2d).tolist(), model.t2d.tolist()
  else:
    want["d2t/t2d"], have["d2t/t2d"] = (None, None), (model.d2t, model.t2d)
  diff = [f"{k}: ours {want[k]} speculators {have[k]}" for k in want if want[k] != have[k]]
  notes.append("flags ok" if not diff else "FLAGS DIFFER: " + "; ".join(diff))
  ours, theirs = our_logits(ckpt, jnp.asarray(embed), tokens, aux), spec_logits(model, tokens, aux)
  if len(theirs) != 2 or theirs[0].shape != ours[0].shape:
    notes.append(f"LOGITS SHAPE: ours {ours[0].shape}, speculators {[t.shape for t in theirs]}")
  else:
    d = [float(np.abs(o - t).max()) for o, t in zip(ours, theirs)]
    flag = "" if max(d) < 1e-4 else " MISMATCH"
    notes.append(f"logits max|diff| step1 {d[0]:.1e} step2 {d[1]:.1e} (|logits|~{np.abs(ours[0]).max():.1f}){flag}")
  return notes


def speculators_roundtrip(model, ckpt, embed, path) -> str:
  model.save_pretrained(path)
  # speculators keeps unknown config keys, so our own block comes back; drop it so the read sees only what
  # speculators itself writes (aux ids, flags, a diff-only transformer_layer_config with nested rope_parameters).
  config = json.loads((path / "config.json").read_text())
  config.pop(FORMAT_KEY, None)
  (path / "config.json").write_text(json.dumps(config))
  keys = sorted(config)
  try:
    back = interop.read_draft(path)
  except ValueError as e:
    return f"speculators save -> read FAILED: {e} (config keys {keys})"
  diff = [k for k in VARIANT_FLAGS + ("draft_vocab_size", "rope_theta", "rms_norm_eps", "num_kv_heads", "head_dim",
                                      "qk_norm", "sliding_window", "num_layers")
          if getattr(back.cfg, k) != getattr(ckpt.cfg, k)]
  if back.aux_layer_ids != AUX:
    diff.append(f"aux {back.aux_layer_ids}")
  ours, theirs = jax.tree.leaves_with_path(ckpt.params), dict(jax.tree.leaves_with_path(back.params))
  diff += [jax.tree_util.keystr(k) for k, v in ours if not np.array_equal(v, theirs.get(k))]
  if not np.array_equal(np.asarray(back.vocab.d2t), np.asarray(ckpt.vocab.d2t)):
    diff.append("d2t")
  if back.embed is None or not np.array_equal(back.embed, embed):
    diff.append("embed_tokens")
  return "speculators save -> read ok" if not diff else f"speculators save -> read DIFFERS: {diff}"


def main() -> int:
  print(f"speculators {importlib.metadata.version('speculators')}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, jax {jax.__version__}")
  print(f"stand-in modules: {STAND_INS or 'none'}")
  root = pathlib.Path(tempfile.mkdtemp(prefix="spec_interop_"))
  vdir = root / "verifier"
  embed = make_verifier(vdir)
  print(f"verifier: random LlamaForCausalLM D={D} L={L} V={V} at {vdir}; aux layers {list(AUX)} (input numbering)")
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, V, (1, T)), jnp.int32)
  aux = jnp.asarray(rng.standard_normal((1, T, len(AUX) * D)), jnp.float32)
  failures = 0
  for i, (name, flags, vd, extra) in enumerate(VARIANTS):
    ckpt = make_ckpt(flags, vd, extra, seed=i)
    out = root / f"ours_{i}"
    interop.write_draft(out, ckpt, layout="speculators", verifier=str(vdir), verifier_architectures=[
        "LlamaForCausalLM"], target_embed=embed)
    notes = []
    try:
      conf = Eagle3SpeculatorConfig.from_pretrained(out)
      known = set(Eagle3SpeculatorConfig.model_fields) | set(transformers.PretrainedConfig().to_dict())
      unknown = sorted(set(json.load(open(out / "config.json"))) - known)
      notes.append("config ok" + (f" (extra keys kept as-is: {unknown})" if i == 0 and unknown else ""))
      assert conf.speculators_model_type == "eagle3"
      model = Eagle3DraftModel.from_pretrained(out).float().eval()
      notes += check_loaded(model, ckpt, out, embed, tokens, aux)
      notes.append(speculators_roundtrip(model, ckpt, embed, root / f"spec_{i}"))
    except Exception as e:  # noqa: BLE001 - report, go on with the next variant
      notes.append(f"FAILED: {type(e).__name__}: {e}")
    failures += any(("DIFFER" in n or "FAIL" in n or "MISMATCH" in n or "SHAPE" in n) for n in notes)
    print(f"{name} [Vd={vd}]: " + ", ".join(notes))
    if name in CONVERT_VARIANTS:
      src, dst = root / f"eagle_{i}", root / f"conv_{i}"
      interop.write_draft(src, ckpt, layout="eagle", verifier=str(vdir), verifier_architectures=["LlamaForCausalLM"])
      r = subprocess.run([sys.executable, "-m", "eagle3_jax.convert", str(src), str(dst), "--to", "speculators",
                          "--target", str(vdir)], capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"})
      if r.returncode:
        notes = [f"convert FAILED rc={r.returncode}: {r.stderr.strip()[-400:]}"]
      else:
        try:
          Eagle3SpeculatorConfig.from_pretrained(dst)
          model = Eagle3DraftModel.from_pretrained(dst).float().eval()
          notes = ["config ok"] + check_loaded(model, ckpt, dst, embed, tokens, aux)
        except Exception as e:  # noqa: BLE001
          notes = [f"FAILED: {type(e).__name__}: {e}"]
      failures += any(("DIFFER" in n or "FAIL" in n or "MISMATCH" in n or "SHAPE" in n) for n in notes)
      print("  eagle -> convert --to speculators --target: " + ", ".join(notes))
  print(f"{'all checks passed' if not failures else f'{failures} case(s) with differences'}; files under {root}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
