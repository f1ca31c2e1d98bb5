"""What a training run starts from: multi-host setup, the tokenizer, the frozen target, a warm start, the draft
vocabulary, the feature store and the training iterator."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from eagle3_jax.config import LlamaConfig, TrainConfig
from eagle3_jax.draft import vocab as vocab_lib
from eagle3_jax.train import data, features
from eagle3_jax.train import step as step_lib

log = logging.getLogger(__name__)


def init_distributed(cfg: TrainConfig) -> None:
  """jax.distributed.initialize() from the config; unset fields are auto-detected (TPU pods, SLURM, ...)."""
  kw: dict[str, Any] = {}
  if cfg.coordinator_address:
    kw["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes > 0:
    kw["num_processes"] = cfg.num_processes
  if cfg.process_id >= 0:
    kw["process_id"] = cfg.process_id
  jax.distributed.initialize(**kw)


def char_tokenizer():
  """A character-level ChatML tokenizer built in memory (≤ 100 ids): lets configs/tiny.py run with no files."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
  chars = ["\n"] + [chr(c) for c in range(32, 127)]
  tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                               bos_token="<|im_start|>", additional_special_tokens=specials[2:])
  hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  return hf


def load_tokenizer(cfg: TrainConfig):
  if cfg.target.tokenizer == "char":
    return char_tokenizer()
  from eagle3_jax.target import load

  return load.load_tokenizer(cfg.target.tokenizer or cfg.target.path)


def load_target(cfg: TrainConfig, mesh) -> tuple[LlamaConfig, Any]:
  """(config, params) of the frozen target, placed in the rules-table shardings."""
  dtype = jnp.dtype(cfg.target.dtype)
  if cfg.target.random is not None:
    tcfg = cfg.target.random
    return tcfg, step_lib.random_target(jax.random.key(cfg.target.seed), mesh, tcfg, dtype=dtype,
                                         init_std=cfg.target.random_init_std)
  from eagle3_jax.target import load

  tcfg, params = load.load_target(cfg.target.path, mesh=mesh, dtype=dtype)
  if cfg.target.aux_layers is not None:
    tcfg = dataclasses.replace(tcfg, aux_layers=tuple(cfg.target.aux_layers))
  return tcfg, jax.device_put(params, step_lib.target_shardings(mesh, tcfg, dtype))


def warm_start(cfg: TrainConfig, target_cfg: LlamaConfig, draft_cfg: Any) -> Any:
  """The DraftCheckpoint named by cfg.init_from, checked against this run's target taps and draft shape."""
  from eagle3_jax import interop

  ckpt = interop.read_draft(cfg.init_from, num_target_layers=target_cfg.num_layers)
  if tuple(ckpt.aux_layer_ids) != tuple(target_cfg.aux_layer_ids):
    raise ValueError(f"init_from={cfg.init_from} reads target layers {tuple(ckpt.aux_layer_ids)}, this run "
                     f"{tuple(target_cfg.aux_layer_ids)}")
  if ckpt.cfg != draft_cfg:
    diff = [f.name for f in dataclasses.fields(draft_cfg) if getattr(ckpt.cfg, f.name) != getattr(draft_cfg, f.name)]
    raise ValueError(f"init_from={cfg.init_from} is a draft of another shape ({', '.join(diff)} differ from this "
                     "run's config)")
  return ckpt


def draft_vocab(cfg: TrainConfig, run_dir: pathlib.Path, tokenizer, target_cfg: LlamaConfig,
                warm: Any = None) -> vocab_lib.DraftVocab:
  """The run's draft vocabulary: built from the training split on the first start (or taken from the init_from
  draft), reused (and checked against this dataset and tokenizer, or that draft) on every later one. Process 0
  builds; the others wait and read."""
  V = target_cfg.vocab_size
  Vd = min(cfg.draft.draft_vocab_size, V)
  path = run_dir / "draft_vocab.safetensors"
  kw = dict(vocab_size=V, max_examples=cfg.draft.vocab_max_examples)
  expect = (vocab_lib.vocab_provenance(cfg.data, tokenizer, Vd, **kw) if not cfg.init_from else
            {"format": vocab_lib.FORMAT_VERSION, "init_from": str(cfg.init_from), "vocab_size": V,
             "draft_vocab_size": Vd})
  if jax.process_index() == 0:
    if cfg.init_from and not path.exists():
      if warm is None:
        raise ValueError(f"{run_dir} has checkpoints but no draft vocabulary; it cannot be resumed")
      t2d = np.asarray(warm.vocab.t2d, bool)
      vm = vocab_lib.DraftVocab(d2t=np.asarray(warm.vocab.d2t, np.int64), t2d=t2d, counts=np.zeros((V,), np.int64),
                                provenance=expect)
      vocab_lib.save_vocab(path, vm)
    elif cfg.init_from:
      vm = vocab_lib.load_vocab(path, expect=expect)
    else:
      vm = vocab_lib.load_or_build_vocab(path, cfg.data, tokenizer, Vd, **kw)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("draft_vocab")
  if jax.process_index() != 0:
    vm = vocab_lib.load_vocab(path, expect=expect)
  return vm


def dump_batches(cfg: TrainConfig, tokenizer, *, token_budget: int = 4096) -> Iterator[dict[str, np.ndarray]]:
  """The training split once, sorted by length and cut into length-bucketed batches of about token_budget
  tokens: the feature dump runs the target over (almost) no padding. Deterministic, so a dump resumes."""
  examples = list(data.iterate_examples(cfg.data, tokenizer, split="train"))
  order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
  buckets = np.asarray(features.bucket_lengths(cfg.data.max_length))
  i = 0
  while i < len(order):
    T = int(buckets[np.searchsorted(buckets, len(examples[order[i]][0]))])
    B = max(1, token_budget // T)
    idx = [j for j in order[i:i + B] if len(examples[j][0]) <= T]  # sorted: stops at the next bucket
    i += len(idx)
    batch = {"tokens": np.zeros((len(idx), T), np.int32), "loss_mask": np.zeros((len(idx), T), np.int32),
             "lengths": np.array([len(examples[j][0]) for j in idx], np.int32)}
    for row, j in enumerate(idx):
      batch["tokens"][row, :len(examples[j][0])] = examples[j][0]
      batch["loss_mask"][row, :len(examples[j][0])] = examples[j][1]
    yield batch


def ensure_features(cfg: TrainConfig, tokenizer, target_cfg: LlamaConfig, target_params: Any) -> None:
  """Dumps (or finishes dumping) the offline feature store of the training split if it is not complete."""
  index = pathlib.Path(cfg.feature_dir) / features.INDEX
  dataset = json.dumps(data.dataset_fingerprint(cfg.data), sort_keys=True)
  if index.exists():
    stored = json.loads(index.read_text())
    if stored.get("dataset") != dataset:  # e.g. the source file grew since the dump: never train on stale rows
      raise ValueError(f"feature store {cfg.feature_dir} was dumped from other data ({stored.get('dataset')}), "
                       f"this run reads {dataset}; delete it or set another feature_dir")
    if stored.get("complete"):
      return
  if jax.process_count() > 1:
    raise ValueError(f"feature store {cfg.feature_dir} is missing or incomplete; dump it in a single process first")
  log.info("dumping target features of %s to %s", cfg.data.source, cfg.feature_dir)
  t0 = time.perf_counter()
  batches = list(dump_batches(cfg, tokenizer))  # token ids only: small, and the bar gets its total
  out = features.dump_features(cfg.feature_dir, batches, target_params, target_cfg=target_cfg,
                               target_name=cfg.target.path or "default", dataset=dataset,
                               dtype=cfg.feature_dtype, resume=True, seq_len=cfg.data.max_length,
                               examples_per_shard=128,  # a kill loses at most one shard (~5 min on 2 CPU cores)
                               total=sum(len(b["lengths"]) for b in batches), progress=cfg.progress)
  log.info("feature store: %d examples, %d tokens in %.0f s", out["num_examples"], out["num_tokens"],
           time.perf_counter() - t0)


def train_iterator(cfg: TrainConfig, tokenizer, target_cfg: LlamaConfig, target_params: Any):
  """Checkpointable iterator of this process's batches: tokenised conversations, or stored features (offline,
  in length buckets)."""
  if cfg.features == "online":
    return data.make_iterator(cfg.data, tokenizer, split="train")
  ensure_features(cfg, tokenizer, target_cfg, target_params)
  # The fingerprint reads weight corners, which needs every shard on this host: single-process runs only.
  store = features.FeatureStore(cfg.feature_dir, target_cfg=target_cfg,
                                target_params=target_params if jax.process_count() == 1 else None)
  if store.seq_len != cfg.data.max_length:
    raise ValueError(f"feature store {cfg.feature_dir} holds sequences of {store.seq_len} tokens but "
                     f"data.max_length={cfg.data.max_length}; set data.max_length={store.seq_len}")
  return features.BucketedBatches(store, cfg.data.batch_size, seed=cfg.data.seed,
                                  shard_index=jax.process_index(), shard_count=jax.process_count())


def batch_shapes(cfg: TrainConfig, target_cfg: LlamaConfig, *, online: bool) -> dict[str, tuple[int, ...]]:
  """Global shapes of one batch (for shardings, before any batch exists)."""
  B, T, D = cfg.data.batch_size * jax.process_count(), cfg.data.max_length, target_cfg.hidden_size
  shapes = {"tokens": (B, T), "loss_mask": (B, T), "lengths": (B,)}
  if not online:
    shapes |= {"aux": (B, T, D * len(target_cfg.aux_layer_ids)), "hidden": (B, T, D), "argmax": (B, T)}
  return shapes


def _empty_batch(cfg: TrainConfig) -> dict[str, np.ndarray]:
  B, T = cfg.data.batch_size, cfg.data.max_length
  return {"tokens": np.zeros((B, T), np.int32), "loss_mask": np.zeros((B, T), np.int32),
          "lengths": np.zeros((B,), np.int32)}
