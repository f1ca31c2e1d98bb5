"""Trains an EAGLE-3 draft head: `python train.py --config configs/X.py [key=value ...]`.

Resumes automatically from the newest checkpoint in <run_dir>/checkpoints; SIGTERM saves and exits cleanly.
The last stdout line is one JSON object (step, loss, acc_0, tokens_per_s, checkpoint_dir, ...).
"""

import argparse
import json
import logging

from eagle3_jax.config import load_config


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="a configs/*.py file defining get_config()")
  parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4 mesh.fsdp=8")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save at INFO
  cfg = load_config(args.config, args.overrides)  # before JAX touches a device (jax.distributed must come first)

  import jax

  from eagle3_jax.train import loop

  summary = loop.train(cfg)
  if jax.process_index() == 0:
    print(json.dumps(summary), flush=True)
  return summary


if __name__ == "__main__":
  main()
