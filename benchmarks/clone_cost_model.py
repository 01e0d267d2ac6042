"""A cost model for cloning at scale, from the per-image costs measured by ``clone_cost.py``.

The measured ResNetC-20 rows (28 px Fashion-MNIST, one CPU thread) give three unit costs:
seconds per image-step of candidate training (L_ins + L_loc passes through a branch and
the target up to R), seconds per frozen forward image (the target and the source on the
pools, and G's occluded images) and seconds per tuning image-step. They are scaled by the
ratio of multiply-accumulates per image to a ResNet-50 pair at 224 px on ImageNet-100 and
multiplied by the counts of work the default search does there; candidates of one stage
run in parallel on N workers (the Ray backend's unit of work).
"""

from __future__ import annotations

import math
from typing import Any

from pnc.surgery.insertion import SearchConfig

RESNETC20_MACS = 40.8e6  # per 28 x 28 image (torch-pruning's counter, see benchmarks/results/zoo.md)
RESNET50_MACS = 4.1e9  # per 224 x 224 image
DECODE_SECONDS = 0.004  # one 224 px JPEG decoded and resized on one core (PIL; an assumption, not measured here)


def unit_costs(row: dict[str, Any]) -> dict[str, float]:
    """Seconds per image-step of training, per frozen forward image, per tuning image-step."""
    cfg = SearchConfig()
    images = row["images"]
    steps = max(math.ceil(images["clone_train"] / cfg.batch_size), cfg.min_steps_per_epoch)
    cands = row["candidates"]
    finalists = sum(1 for c in cands if c["stage"] == "binary")
    ph = row["phases"]
    # L_loc and L_ins each pass a batch through the branch in the search stage: two image-passes per step
    search_passes = len(cands) * steps * cfg.batch_size * (2 * cfg.loc_epochs + 2 * cfg.joint_epochs)
    binary_passes = finalists * steps * cfg.batch_size * cfg.binary_epochs
    train = sum(ph.get(f"phase:{p}", 0.0) for p in ("localize", "joint", "binary"))
    g_images = min(round(0.3 * images["clone_train"]), math.ceil(cfg.loc_pool / 100)) * 100
    pool = images["old_train"] + images["clone_train"] + images["old_holdout"] + images["clone_holdout"]
    frozen = ph.get("frozen_outputs", 0.0) + ph.get("local_models", 0.0)
    return {
        "train_pass": train / (search_passes + binary_passes),
        "frozen_forward": frozen / (2 * pool + g_images),
        "tune_step": ph.get("tune_branch", 0.0) / (cfg.tune_epochs * (images["old_train"] + images["clone_train"])),
    }


def extrapolate(units: dict[str, float], workers: int) -> dict[str, float]:
    """Seconds of each part of a ResNet-50 clone on ImageNet-100 at S (10 of 50 source
    classes, 30% of 1300 training images per class of both sets), 16 block cuts."""
    cfg = SearchConfig()
    scale = RESNET50_MACS / RESNETC20_MACS
    clone_images, old_images = 10 * 390, 50 * 390
    steps = max(math.ceil(clone_images / cfg.batch_size), cfg.min_steps_per_epoch)
    candidates, finalists = 16, math.ceil(16 * cfg.keep_fraction)
    per_search = steps * cfg.batch_size * (2 * cfg.loc_epochs + 2 * cfg.joint_epochs) * units["train_pass"] * scale
    per_binary = steps * cfg.batch_size * cfg.binary_epochs * units["train_pass"] * scale
    frozen_images = 2 * 1.25 * (clone_images + old_images) + math.ceil(cfg.loc_pool / 100) * 100
    return {
        "data loading": (clone_images + old_images) * 1.25 * DECODE_SECONDS,
        "G + frozen outputs": frozen_images * units["frozen_forward"] * scale,
        "search stage": math.ceil(candidates / workers) * per_search,
        "binary stage": math.ceil(finalists / workers) * per_binary,
        "tuning": cfg.tune_epochs * (clone_images + old_images) * units["tune_step"] * scale,
    }


def cost_model_section(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the cost model (empty without a measured ResNetC-20 ``after`` row)."""
    measured = [r for r in rows if r["label"] == "after" and r["arch"] == "resnetc20" and r.get("phases")]
    if not measured:
        return []
    row = max(measured, key=lambda r: (r["scale"] == "S", r["old_fraction"]))
    units = unit_costs(row)
    lines = [
        "## Cost model: a ResNet-50 pair on ImageNet-100",
        "",
        f"Unit costs measured on the ResNetC-20 {row['scale']} (old fraction {row['old_fraction']:g}) `after` row: "
        f"{1e3 * units['train_pass']:.3f} ms per image-pass of candidate training, "
        f"{1e3 * units['frozen_forward']:.3f} ms per frozen forward image (pools, held-out images, G), "
        f"{1e3 * units['tune_step']:.3f} ms per tuning image-step; scaled by "
        f"{RESNET50_MACS / RESNETC20_MACS:.0f}x (ResNet-50 at 224 px: {RESNET50_MACS / 1e9:.1f} GMACs per image, "
        f"ResNetC-20 at 28 px: {RESNETC20_MACS / 1e6:.1f} MMACs), i.e. assuming a CPU core runs both at the "
        "same MAC rate. Task: S = 10 of the source's 50 classes, 30% of 1300 images per class of both sets "
        "(3,900 clone and 19,500 old-class images), 16 block cuts, default search (keep "
        f"{SearchConfig().keep_fraction:g} after the first stage), JPEG decoding at "
        f"{1e3 * DECODE_SECONDS:.0f} ms per image per core (assumed). "
        "Candidates of a stage run in parallel on N single-core workers (Ray); the frozen outputs, G and the "
        "tuning run on one.",
        "",
        "| part | N=1 | N=4 | N=16 |",
        "|---|---:|---:|---:|",
    ]
    cols = [extrapolate(units, n) for n in (1, 4, 16)]
    for part in cols[0]:
        lines.append(f"| {part} | " + " | ".join(f"{c[part] / 3600:.1f} h" for c in cols) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(c.values()) / 3600:.1f} h**" for c in cols) + " |")
    joint = [r for r in rows if r["label"] == "Joint+Full" and r["arch"] == "resnetc20"]
    if joint:
        j = joint[0]
        classes = 6 if j["scale"] == "S" else 8
        per_pass = j["seconds"] / (3 * classes * 6000)  # the zoo recipe: 3 epochs over 6,000 images per class
        hours = 60 * 1300 * 90 * per_pass * RESNET50_MACS / RESNETC20_MACS / 3600
        lines += [
            "",
            f"Joint+Full, for comparison: measured {1e3 * per_pass:.2f} ms per image-pass (forward and backward "
            f"of the whole ResNetC-20, its {j['scale']} row), scaled the same way, 90 epochs (the usual ResNet-50 "
            f"recipe) over 60 x 1300 images: {hours:,.0f} h on one core, {hours / 16:,.0f} h on 16 "
            "(data-parallel, ignoring communication).",
        ]
    return lines
