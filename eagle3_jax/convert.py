"""CLI: convert an EAGLE-3 draft between layouts, e.g. `python -m eagle3_jax.convert SRC DST --to speculators`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from eagle3_jax import interop


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m eagle3_jax.convert",
      description="Read an EAGLE-3 draft in any supported layout (official EAGLE .bin/.safetensors, SGLang / "
                  "SpecForge, ModelOpt, speculators) and write it in the official/SGLang ('eagle') or the "
                  "speculators (vLLM) layout. Aux-layer ids are renumbered for the destination layout.")
  p.add_argument("src", help="source draft directory (config.json + weights)")
  p.add_argument("dst", help="destination directory (created atomically)")
  p.add_argument("--to", required=True, choices=interop.WRITE_LAYOUTS, help="destination layout")
  p.add_argument("--num-target-layers", type=int, default=None,
                 help="the target's num_hidden_layers; required when SRC states no aux layer ids (official "
                      "EAGLE files), which then default to (2, L//2, L-3)")
  p.add_argument("--verifier", default=None,
                 help="target model HF id or path (required for --to speculators unless SRC names one)")
  p.add_argument("--verifier-arch", action="append", default=None, dest="verifier_architectures",
                 help="target architecture for speculators_config.verifier, e.g. LlamaForCausalLM (repeatable)")
  p.add_argument("--speculative-tokens", type=int, default=None,
                 help="speculators proposal length (default: SRC's, else 3)")
  p.add_argument("--max-position-embeddings", type=int, default=None,
                 help="max_position_embeddings of the draft config (default: SRC's, else 2048)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                 help="float dtype of the written weights; auto keeps SRC's")
  p.add_argument("--target", default=None,
                 help="target (HF directory or .gguf) whose input embedding is written as embed_tokens when SRC has "
                      "none; 'default' = the embedded SmolLM2, used automatically when the verifier is its hub id. "
                      "speculators' from_pretrained leaves a missing embedding at zero")
  p.add_argument("--no-embed", action="store_true",
                 help="write no embed_tokens.weight (for servers that share the target's, e.g. vLLM)")
  p.add_argument("--norm-output-means", default=None, choices=interop.formats.NORM_OUTPUT_MEANINGS,
                 help="how to read norm_output in an official/SGLang-layout SRC that does not say: eagle3.1 "
                 "(SpecForge after PR #879, vLLM, SGLang) or final-norm (SpecForge 0.2.0)")
  p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    ckpt = interop.read_draft(args.src, num_target_layers=args.num_target_layers,
                              norm_output_means=args.norm_output_means)
    dtype = ckpt.extra.get("file_dtype", "float32") if args.dtype == "auto" else args.dtype
    if dtype not in ("float32", "bfloat16", "float16"):
      dtype = "float32"  # e.g. a float64 source
    target_embed, embed_from = _target_embed(args, ckpt)
    interop.write_draft(args.dst, ckpt, layout=args.to, verifier=args.verifier, dtype=dtype,
                        verifier_architectures=args.verifier_architectures,
                        speculative_tokens=args.speculative_tokens,
                        max_position_embeddings=args.max_position_embeddings, include_embed=not args.no_embed,
                        target_embed=target_embed, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  aux = ckpt.aux_layer_ids
  shown = aux if args.to == "speculators" else interop.aux_ids_to_output_numbering(aux)
  numbering = "input" if args.to == "speculators" else "output"
  print(f"{args.src} ({ckpt.source_layout}) -> {args.dst} ({args.to}, {dtype}); aux layers {list(aux)} in input "
        f"numbering, written as {list(shown)} ({numbering} numbering); D={ckpt.cfg.hidden_size} "
        f"Vd={ckpt.cfg.draft_vocab_size} V={ckpt.cfg.vocab_size}; embed_tokens: {embed_from}")
  return 0


def _target_embed(args: argparse.Namespace, ckpt: interop.DraftCheckpoint) -> tuple[Any, str]:
  """The embedding to write when SRC carries none, and where it came from (for the summary line)."""
  from eagle3_jax.target import load, protocol  # deferred: loads a target only when one is needed

  if args.no_embed:
    return None, "none (--no-embed)"
  if ckpt.embed is not None:
    return None, "SRC's own"
  verifier = args.verifier or ckpt.extra.get("verifier")
  target = args.target
  if target is None and args.to == "speculators" and verifier == load.DEFAULT_TARGET_HUB_ID:
    target = "default"
  if target is None:
    return None, "none (SRC has none; --target gives the target's)"
  cfg, params = load.load_target(None if target == "default" else target)
  if (cfg.vocab_size, cfg.hidden_size) != (ckpt.cfg.vocab_size, ckpt.cfg.hidden_size):
    raise ValueError(f"--target {target}: embedding ({cfg.vocab_size}, {cfg.hidden_size}) does not fit the draft's "
                     f"(vocab_size, hidden_size) = ({ckpt.cfg.vocab_size}, {ckpt.cfg.hidden_size})")
  return np.asarray(protocol.llama_target(cfg).embed(params), np.float32), f"the target's ({target})"


if __name__ == "__main__":
  sys.exit(main())
