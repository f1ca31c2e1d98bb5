"""Learning curve of a draft-training run: eval acc_j and simulated tau against tokens trained (PNG).

    python benchmarks/plot_curve.py runs/smollm2_135m [more run dirs, plotted in order as one curve] --out curve.png
    python benchmarks/plot_curve.py runs/cmp_canonical runs/cmp_eagle31 --separate --out cmp.png  # one curve each
    python benchmarks/plot_curve.py runs/gpu/train runs/gpu/train2 --train --out gpu.png  # + training-batch acc_j
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re


def eval_rows(run_dirs: list[str], split: str = "eval") -> list[dict]:
  """Eval rows of the run dirs in order; a later dir continues the tokens of the one before (init_from phases).
  When a run was warm-started from `<previous run>/export_step_N`, the previous run counts only up to step N."""
  runs = [pathlib.Path(d) for d in run_dirs]
  rows, offset = [], 0.0
  for i, d in enumerate(runs):
    these = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    stop = float("inf")
    if i + 1 < len(runs):
      init = pathlib.Path(json.loads((runs[i + 1] / "config.json").read_text()).get("init_from") or "")
      if init.parent.resolve() == d.resolve() and re.fullmatch(r"export_step_\d+", init.name):
        stop = int(init.name.rsplit("_", 1)[1])
    these = [r for r in these if r["step"] <= stop]
    rows += [r | {"tokens_trained": r.get("tokens_trained", 0.0) + offset} for r in these if r["split"] == split]
    train = [r for r in these if r["split"] == "train" and "tokens_trained" in r]
    offset += train[-1]["tokens_trained"] if train else 0.0
  return rows


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("run_dirs", nargs="+")
  ap.add_argument("--out", required=True)
  ap.add_argument("--separate", action="store_true",
                  help="each run its own curves (acc_0, acc_2, tau), e.g. variants trained side by side")
  ap.add_argument("--train", action="store_true",
                  help="also the training batches' acc_j (thin lines, mean of 10 logged steps): runs with few evals")
  args = ap.parse_args(argv)
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if args.separate:
    return plot_separate(args.run_dirs, args.out, plt)
  rows = eval_rows(args.run_dirs)
  if not rows:
    raise SystemExit("no eval rows in " + ", ".join(args.run_dirs))
  x = [r["tokens_trained"] / 1e6 for r in rows]
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for j in range(max(len(r["acc_j"]) for r in rows)):
    pts = [(xi, r["acc_j"][j]) for xi, r in zip(x, rows) if len(r["acc_j"]) > j]
    a.plot(*zip(*pts), marker="o", label=f"acc_{j}")
  if args.train:
    train = eval_rows(args.run_dirs, split="train")
    for j in range(max((len(r["acc_j"]) for r in train), default=0)):
      pts = [(r["tokens_trained"] / 1e6, r["acc_j"][j]) for r in train if len(r["acc_j"]) > j]
      xs, ys = zip(*pts)
      k = 10
      smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
      a.plot(xs, smooth, lw=0.8, alpha=0.6, color=f"C{j}", label=f"train acc_{j}")
  a.set(xlabel="tokens trained (M)", ylabel="accuracy", title="held-out acc_j (points)" +
        (", training batches (lines)" if args.train else ""))
  a.legend(fontsize=8)
  a.grid(alpha=0.3)
  b.plot(x, [r["tau"] for r in rows], marker="o", color="k")
  b.set(xlabel="tokens trained (M)", ylabel="tau (chain, simulated)", title="simulated tau")
  b.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out} ({len(rows)} eval points)")


def plot_separate(run_dirs: list[str], out: str, plt) -> None:
  """acc_0 (solid) and acc_2 (dashed), and simulated tau, per run against tokens trained."""
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for d in run_dirs:
    rows = eval_rows([d])
    if not rows:
      raise SystemExit(f"no eval rows in {d}")
    x = [r["tokens_trained"] / 1e6 for r in rows]
    name = pathlib.Path(d).name
    line, = a.plot(x, [r["acc_j"][0] for r in rows], marker="o", label=f"{name} acc_0")
    a.plot(x, [r["acc_j"][2] for r in rows], marker="s", ls="--", color=line.get_color(), label=f"{name} acc_2")
    b.plot(x, [r["tau"] for r in rows], marker="o", color=line.get_color(), label=name)
  a.set(xlabel="tokens trained (M)", ylabel="held-out accuracy", title="eval acc_0 and acc_2")
  b.set(xlabel="tokens trained (M)", ylabel="tau (chain, simulated)", title="simulated tau")
  for ax in (a, b):
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  print(f"wrote {out} ({len(run_dirs)} runs)")


if __name__ == "__main__":
  main()
