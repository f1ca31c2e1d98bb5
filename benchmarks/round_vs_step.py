"""A plain decode step and two real rounds (1x1x1, 2x3x6) timed side by side, four interleaved passes: how a round
compares with a step when both are measured within the same seconds (this machine drifts within minutes).

    python benchmarks/round_vs_step.py [BATCH [DRAFT_DIR]]
"""
import sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import jax, jax.numpy as jnp
from eagle3_jax.decode import engine
from eagle3_jax.decode.autotree import costs as C
from eagle3_jax.decode.tree import TreeConfig
from eagle3_jax.target import load, protocol
cfg, params = load.load_target(None, dtype=jnp.float32)
DRAFT = sys.argv[2] if len(sys.argv) > 2 else "eagle3_jax/drafts/smollm2_135m_instruct"
cfg, ckpt = engine.load_draft(DRAFT, cfg)
target = protocol.llama_target(cfg)
dp = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), ckpt.params)
B, S = int(sys.argv[1]) if len(sys.argv) > 1 else 1, 256
t1 = TreeConfig.chain(1); t2 = TreeConfig(top_k=2, depth=3, total_tokens=6)
for i in range(4):
  step = C.decode_step_cost(params, cfg, batch=B, cache_len=S, n=8, first=[])
  r1 = C._round_cost(target, params, dp, ckpt.vocab, ckpt.cfg, batch=B, cache_len=S, tcfg=t1, n=8)
  r2 = C._round_cost(target, params, dp, ckpt.vocab, ckpt.cfg, batch=B, cache_len=S, tcfg=t2, n=8)
  print(f"B={B} iter {i}: step {step*1e3:.1f} ms, 1x1x1 {r1*1e3:.1f} ({r1/step:.2f}x), 2x3x6 {r2*1e3:.1f} ({r2/step:.2f}x)", flush=True)
