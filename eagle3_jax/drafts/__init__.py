"""Drafts shipped inside the package, found with no network: the default draft of the embedded SmolLM2 target.

Each draft is a directory in the official EAGLE-3 layout (config.json + model.safetensors, float16) with a card
(README.md: data, recipe, measured acceptance) and serving.json (the tree shape measured fastest on the machine
the card names). `python -m eagle3_jax.drafts SRC` turns a training export into the shipped draft.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT = "smollm2_135m_instruct"  # the draft of the embedded default target


def default_draft_path() -> pathlib.Path | None:
  """The shipped draft of the embedded SmolLM2-135M-Instruct, or None if this checkout has none."""
  path = HERE / DEFAULT
  return path if (path / "config.json").is_file() and (path / "model.safetensors").is_file() else None


def serving_tree(path: str | pathlib.Path) -> dict[str, int] | None:
  """The (top_k, depth, total_tokens) recorded beside a draft as fastest where it was measured, if any."""
  f = pathlib.Path(path) / "serving.json"
  return json.loads(f.read_text())["tree"] if f.is_file() else None


def ship(src: str, dst: str | pathlib.Path, *, card: str, tree: dict[str, int], overwrite: bool = True) -> None:
  """Writes the draft at `src` (any readable layout) to `dst` as float16, without embed_tokens (the target's
  embedding serves), with its card and serving tree."""
  from eagle3_jax import interop

  ckpt = interop.read_draft(src)
  interop.write_draft(dst, ckpt, layout="eagle", dtype="float16", include_embed=False, overwrite=overwrite)
  dst = pathlib.Path(dst)
  (dst / "README.md").write_text(card)
  (dst / "serving.json").write_text(json.dumps({"tree": tree}, indent=1) + "\n")


def main(argv: Any = None) -> None:
  ap = argparse.ArgumentParser(prog="python -m eagle3_jax.drafts", description="Ship a trained draft.")
  ap.add_argument("src", help="exported draft directory")
  ap.add_argument("--card", required=True, help="markdown file: the draft's card")
  ap.add_argument("--tree", default="1,3,3", help="serving tree top_k,depth,total_tokens")
  ap.add_argument("--dst", default=str(HERE / DEFAULT))
  args = ap.parse_args(argv)
  k, d, n = (int(x) for x in args.tree.split(","))
  ship(args.src, args.dst, card=pathlib.Path(args.card).read_text(), tree={"top_k": k, "depth": d, "total_tokens": n})
  print(f"shipped {args.src} -> {args.dst}")


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"drafts: error: {e}")
