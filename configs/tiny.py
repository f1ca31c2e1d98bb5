"""Tiny end-to-end run for tests and CI: a random 4-layer target built locally, a character-level ChatML tokenizer
built in memory, and configs/tiny_chat.jsonl (384 short generated conversations). No downloads, no files to fetch.

  python train.py --config configs/tiny.py run_dir=/tmp/tiny num_steps=200
"""

import os

from eagle3_jax.config import LlamaConfig
from eagle3_jax.config import DataConfig
from eagle3_jax.config import MeshConfig
from eagle3_jax.config import TrainDraftConfig, OptimConfig, TrainTargetConfig, TrainConfig, TTTConfig

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_chat.jsonl")


def get_config() -> TrainConfig:
  target = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                       num_kv_heads=2, head_dim=16, max_position_embeddings=128,
                       aux_layers=(1, 2, 3))
  return TrainConfig(
      # A larger init std than 0.02 gives the random target peaked next-token distributions worth imitating.
      target=TrainTargetConfig(random=target, random_init_std=0.1, dtype="float32", tokenizer="char"),
      draft=TrainDraftConfig(draft_vocab_size=64),
      data=DataConfig(source=_DATA, eval_fraction=0.125, max_length=80, batch_size=8, seed=0, num_threads=1,
                      prefetch_buffer_size=8),
      optim=OptimConfig(lr=3e-3, warmup_steps=10, decay="cosine", end_lr_ratio=0.1),
      ttt=TTTConfig(steps=3),
      mesh=MeshConfig(data=-1, fsdp=1, tensor=1),  # all devices data-parallel (8 fake CPU devices in tests)
      num_steps=200, run_dir="runs/tiny", checkpoint_every=100, keep_checkpoints=2, log_every=10,
      eval_every=100, eval_batches=2)
