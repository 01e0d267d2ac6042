"""Is F_c what limits a clone at M? Richer heads refitted on a tuned clone's frozen features.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/head_capacity.py \\
        --target fmnist-lenet5-target --source fmnist-lenet5-source --scale M --seeds 0,1,2

Per seed: PNC with the default search, as Table 1's PNC row (old fraction 0.3, R chosen on
the models' validation rows). Then, on the available training images, every network is
frozen (the target, the tuned branch) and only a head is fitted: the target's pre-logits
(B, D) and the branch features (B, d_f) go in, a correction of the target's logits and the
new logits come out, as F_c does. Heads: ``linear`` (F_c's own shape), ``mlp-H`` (one hidden
ReLU layer of H units). Each is fitted with cross-entropy on the joint labels (Adam, lr 3e-3,
cosine, batch 64, ``--epochs`` passes, seeded), and scored on the training images and the
test images (Ori / Tar / Avg, as the tables). A head that fits the training images better
but not the test images says the features, not F_c, are what the clone lacks. Row
``F_c + validation bias``: the tuned F_c unchanged but for a per-class bias (K,) added to the
cloned logits, fitted with cross-entropy (L-BFGS) on the validation rows the search chose R
on (10% of each class's training images): does a post-hoc calibration of old against new
outputs, the way the calibrated ensemble is fitted, move the test Avg? Writes
``benchmarks/results/head_capacity-<target>-<scale>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pnc.bench.baselines import _clone, lbfgs_minimize
from pnc.bench.metrics import clone_accuracy
from pnc.bench.paper import machine_info
from pnc.bench.results_files import write_json_md
from pnc.bench.search_variants import zoo_pair
from pnc.zoo.tasks import CloneTask, shared_validation

OUT = Path(__file__).resolve().parent / "results"
BATCH, LR = 64, 3e-3


class RefitHead(nn.Module):
    """[pre-logits (B, D), branch features (B, d_f)] -> correction (B, |T_t|) + new (B, |T_s|),
    linear (``hidden`` 0) or through one hidden ReLU layer."""

    def __init__(self, width: int, num_old: int, num_classes: int, hidden: int):
        super().__init__()
        out = nn.Linear(hidden or width, num_classes)
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), out) if hidden else out
        self.num_old = num_old

    def forward(self, pre: Tensor, feats: Tensor, target_logits: Tensor) -> Tensor:
        z = self.net(torch.cat([pre, feats], 1))
        return torch.cat([target_logits + z[:, : self.num_old], z[:, self.num_old :]], 1)


@torch.no_grad()
def frozen_features(net, images: Tensor) -> dict[str, Tensor]:
    """The clone's frozen parts on ``images`` (N, C, H, W): target pre-logits and logits, the
    branch features, and the clone's own logits."""
    (branch,) = net.branch_list()
    _, taps = net.taps()
    parts: dict[str, list[Tensor]] = {"pre": [], "feats": [], "target": [], "clone": []}
    for start in range(0, len(images), 512):
        cut, pre, logits = taps(images[start : start + 512])
        feats = branch.features(cut)
        correction, new = branch.head(pre, feats)  # Branch.forward, the features computed once
        for key, value in zip(parts, (pre, feats, logits, torch.cat([logits + correction, new], 1))):
            parts[key].append(value)
    return {k: torch.cat(v) for k, v in parts.items()}


def scores(logits: Tensor, labels: Tensor, num_old: int) -> dict[str, float]:
    """Ori / Tar / Avg accuracy in % of (N, K) logits (:func:`pnc.bench.metrics.clone_accuracy`):
    labels < num_old are the target's."""
    return {k: 100 * v for k, v in clone_accuracy(logits, labels, num_old).items()}


def fit_head(train: dict[str, Tensor], labels: Tensor, hidden: int, epochs: int, seed: int) -> RefitHead:
    """A :class:`RefitHead` fitted with cross-entropy on the frozen ``train`` features."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_old = train["target"].shape[1]
    head = RefitHead(train["pre"].shape[1] + train["feats"].shape[1], num_old, train["clone"].shape[1], hidden)
    head = head.to(labels.device)
    opt = torch.optim.Adam(head.parameters(), lr=LR)
    steps_per_epoch = len(labels) // BATCH
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen, device=gen.device).to(labels.device)
        for step in range(steps_per_epoch):
            rows = order[step * BATCH : (step + 1) * BATCH]
            loss = F.cross_entropy(head(train["pre"][rows], train["feats"][rows], train["target"][rows]), labels[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return head.eval()


def fit_bias(logits: Tensor, labels: Tensor) -> Tensor:
    """The per-class bias (K,) minimizing the cross-entropy of ``logits`` (M, K) + bias on
    ``labels`` (M,) (convex; L-BFGS from zero)."""
    bias = torch.zeros(logits.shape[1], device=logits.device, requires_grad=True)
    lbfgs_minimize([bias], lambda: F.cross_entropy(logits + bias, labels), lr=1.0, max_iter=200)
    return bias.detach()


def run(args: argparse.Namespace) -> dict[str, Any]:
    target, t_card, source, s_card, splits, budget = zoo_pair(args.zoo_dir, args.target, args.source)
    hiddens = [int(h) for h in args.hidden.split(",")]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        task = CloneTask(
            splits,
            t_card.classes,
            s_card.classes,
            args.scale,
            seed=seed,
            old_fraction=0.3,
            validation=shared_validation(t_card, s_card),
        )
        inputs = task.clone_inputs()
        net, _, details = _clone(task, target, source, seed, budget, None)
        net.eval()
        test_x, test_y = inputs["eval_sets"]["avg"]
        train, test = frozen_features(net, inputs["images"]), frozen_features(net, test_x)
        num_old = train["target"].shape[1]
        as_tuned = (scores(train["clone"], inputs["labels"], num_old), scores(test["clone"], test_y, num_old))
        results = {"PNC (tuned F_c)": as_tuned}
        held_x, held_y = inputs["holdout"]
        bias = fit_bias(frozen_features(net, held_x)["clone"], held_y)
        results["F_c + validation bias"] = (
            scores(train["clone"] + bias, inputs["labels"], num_old),
            scores(test["clone"] + bias, test_y, num_old),
        )
        for hidden in hiddens:
            head = fit_head(train, inputs["labels"], hidden, args.epochs, seed)
            with torch.no_grad():
                fitted = [head(d["pre"], d["feats"], d["target"]) for d in (train, test)]
            name = f"mlp-{hidden}" if hidden else "linear"
            results[name] = (scores(fitted[0], inputs["labels"], num_old), scores(fitted[1], test_y, num_old))
        for name, (on_train, on_test) in results.items():
            rows.append({"seed": seed, "head": name, "train": on_train, "test": on_test})
            print(json.dumps(rows[-1]), flush=True)
        print(f"seed {seed}: R = {details['report']['target_cut']}", file=sys.stderr, flush=True)
    return {
        "target": args.target,
        "source": args.source,
        "scale": args.scale,
        "old_fraction": 0.3,
        "epochs": args.epochs,
        "machine": machine_info(),
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/head_capacity.py " + shlex.join(sys.argv[1:]),
        "rows": rows,
    }


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [
        f"# Head capacity: `{result['target']}` <- `{result['source']}`, {result['scale']}, old fraction "
        f"{result['old_fraction']}",
        "",
        "The tuned clone's networks frozen, heads refitted on its features (target pre-logits + branch "
        f"features -> correction of the target's logits + new logits; cross-entropy, {result['epochs']} epochs "
        "over the available training images). Accuracy in % on those training images and on the test images.",
        "",
        "| head | seed | train Ori / Tar / Avg | test Ori / Tar / Avg |",
        "|---|---|---|---|",
    ]
    fmt = "{ori:.2f} / {tar:.2f} / {avg:.2f}"
    lines += [f"| {r['head']} | {r['seed']} | {fmt.format(**r['train'])} | {fmt.format(**r['test'])} |" for r in rows]
    lines += ["", "| head | mean train Avg | mean test Avg |", "|---|---:|---:|"]
    for head in dict.fromkeys(r["head"] for r in rows):
        mine = [r for r in rows if r["head"] == head]
        train = statistics.mean(r["train"]["avg"] for r in mine)
        test = statistics.mean(r["test"]["avg"] for r in mine)
        lines.append(f"| {head} | {train:.2f} | {test:.2f} |")
    lines += ["", f"Machine: {result['machine']['cpu']}. Command: `{result['command']}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--scale", default="M")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--hidden", default="0,128,512", help="hidden widths to fit, 0: linear")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--zoo-dir", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    stem = OUT / f"head_capacity-{args.target}-{args.scale}"
    write_json_md(stem, result, render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
