"""The default draft trained in one accelerator burst (scripts/gpu_burst.sh): SmolLM2-135M-Instruct's own answers,
regenerated on the same accelerator just before, plus the committed CPU regenerations (data/), features online.

Differences from configs/smollm2_135m.py, and why:
- Online features: an accelerator computes the frozen target faster than a feature store could be written and read
  back, and a burst of a few minutes has no second epoch to amortise a dump over.
- EAGLE 3.1 head (draft.fc_norm, draft.norm_output): from random weights it learned faster than canonical EAGLE-3 on
  the same data (BENCHMARKS.md "Canonical EAGLE-3 against EAGLE 3.1"), and a burst starts from random weights (the
  shipped draft would not fit the lease's transfer limit beside the target).
- One TTT depth (R = 3) for the whole run: each depth is one more compilation of a step holding the 30-layer target,
  tens of seconds of a lease counted in minutes. Three steps train acc_0..acc_2, what chains of depth <= 3 use.
- Batch 32 rows: the accelerator's memory is ample and a larger batch keeps it busy between host steps.
- time_limit_s: the burst stops on time, evaluates and exports whatever step it reached (the schedule assumes
  num_steps; a stop before it leaves the lr above its floor).
fp32 target and draft so that the features match the fp32 target served on the CPU.
"""

from eagle3_jax.config import DataConfig, MeshConfig, OptimConfig, TrainConfig, TrainDraftConfig, TrainTargetConfig
from eagle3_jax.config import TTTConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      target=TrainTargetConfig(path=None, dtype="float32"),
      draft=TrainDraftConfig(draft_vocab_size=8192, fc_norm=True, norm_output=True),
      data=DataConfig(source="runs/gpu/train.jsonl", eval_fraction=0.0, eval_source="runs/gpu/eval.jsonl",
                      max_length=1152, overflow="drop", batch_size=32, seed=42, num_threads=4),
      features="online",
      optim=OptimConfig(lr=1e-3, warmup_steps=30, decay="cosine", end_lr_ratio=0.1, clip_norm=0.5),
      ttt=TTTConfig(steps=3, decay=0.8, loss_norm="tokens"),
      mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
      compute_dtype="float32",
      num_steps=700, time_limit_s=240, run_dir="runs/gpu/train", checkpoint_every=100000, keep_checkpoints=1,
      log_every=10, eval_every=0, eval_batches=8, export_every=0)
