"""EAGLE-3 draft for Llama-3.3-70B-Instruct on a TPU v5p-128 slice: 64 chips (95 GiB HBM each), 16 hosts of 4.

  python train.py --config configs/llama3_70b_v5p.py target.path=/models/Llama-3.3-70B-Instruct \
      data.source=/data/regenerated.jsonl run_dir=gs-fuse-or-nfs/runs/llama3_70b      # on every host

Mesh fsdp 16 × tensor 4: the 141 GB bf16 target is split 64 ways (2.2 GiB per chip), heads / MLP / vocab over
tensor inside a host's 4 chips, FSDP across hosts. data.batch_size is per host: 4 × 16 hosts = 64 sequences of
2048 tokens per step, 4 rows per chip, no rematerialisation. jax.distributed.initialize() finds the slice by itself.
Per chip (eagle3_jax.train.memory: jax.eval_shape of the real parameter tables and rules + activation arithmetic;
tests/test_configs.py holds it under 95 GiB): target 2.1 GiB, draft 0.26 + Adam 0.53 + grads 0.26 GiB, gathered
weights 1.7 GiB, activations 36 GiB; 41 GiB in all. ttt.remat=true brings activations to 12 GiB (8 rows per chip
would then fit); optim.grad_accum=2 halves them.
"""

from eagle3_jax.config import DataConfig
from eagle3_jax.config import MeshConfig
from eagle3_jax.config import TrainDraftConfig, OptimConfig, TrainTargetConfig, TrainConfig, TTTConfig

NUM_HOSTS = 16
NUM_CHIPS = 64


def get_config() -> TrainConfig:
  return TrainConfig(
      target=TrainTargetConfig(path="/models/Llama-3.3-70B-Instruct", dtype="bfloat16"),
      draft=TrainDraftConfig(draft_vocab_size=32000),
      data=DataConfig(source="sharegpt", eval_fraction=0.01, max_length=2048, overflow="drop", batch_size=4,
                      seed=42, num_threads=8),
      optim=OptimConfig(lr=5e-5, warmup_steps=2000, warmup="linear", decay="cosine", end_lr_ratio=0.0,
                      clip_norm=0.5, grad_accum=1),
      ttt=TTTConfig(steps=7, decay=0.8, remat=False),
      mesh=MeshConfig(data=1, fsdp=16, tensor=4),
      compute_dtype="bfloat16",
      num_steps=40000, run_dir="runs/llama3_70b_v5p", checkpoint_every=500, keep_checkpoints=3, log_every=20,
      eval_every=2000, eval_batches=16, export_every=5000, distributed=True)
