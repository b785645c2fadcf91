"""What an aggregation head costs on `cnn_snn`, in one run: training and embedding images/s of the same PlainCNN
trunk under each head, against GeM (the default) measured in the same run.

    python experiments/benchmarks/head_cost.py [--heads gem mixvpr boq salad] [--repeats 3 --steps 5]
        [--device cpu|cuda]

Each head is the encoder of `python train.py model=cnn_snn +ablation=<head>` (the head at its paper's size, from
conf/ablation/; `gem` is the default config), built with the same seed and timed on the same random uint8
batches, interleaved (gem, mixvpr, ..., then the reverse order, ...) --repeats times: training steps of forward
+ backward + AdamW on a pair batch's images, and no-grad embedding in batches of 256 (memory_format.py's
timers). Printed: the medians of images/s per head and each head's ratio to GeM (< 1: slower than GeM).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from memory_format import check_device, embed_rate, train_rate  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", nargs="+", default=["gem", "mixvpr", "boq", "salad"],
                    help="gem (the default) and conf/ablation/ names of heads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per measurement (after 2 warm-up)")
    ap.add_argument("--embed-images", type=int, default=512)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return ap.parse_args(argv)


def encoder(head: str, device: str) -> tuple[torch.nn.Module, int, int, int]:
    """The head's cnn_snn encoder (seed 0) and its images' (batch, height, width)."""
    overrides = ["model=cnn_snn"] + ([] if head == "gem" else [f"+ablation={head}"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    model = instantiate(cfg.model.module.encoder).to(device)
    return model, 2 * int(cfg.model.batch_size), int(cfg.model.inputs.height), int(cfg.model.inputs.width)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    check_device(args.device)
    if "gem" not in args.heads:
        args.heads = ["gem", *args.heads]  # the baseline is measured in the same run
    models = {head: encoder(head, args.device) for head in args.heads}
    batch, h, w = models["gem"][1:]
    gen = torch.Generator().manual_seed(0)
    train_images = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=gen).to(args.device)
    embed_images = torch.randint(0, 256, (args.embed_images, 3, h, w), dtype=torch.uint8, generator=gen)
    embed_images = embed_images.to(args.device)
    print(f"cnn_snn, {batch} images {h}x{w} per training step, device={args.device}, "
          f"threads={torch.get_num_threads()}, torch {torch.__version__}")
    rates: dict[str, dict[str, list[float]]] = {head: {"train": [], "embed": []} for head in args.heads}
    for r in range(args.repeats):
        for head in args.heads if r % 2 == 0 else reversed(args.heads):
            model = models[head][0]
            rates[head]["train"].append(train_rate(model, train_images, args.steps, args.device))
            rates[head]["embed"].append(embed_rate(model, embed_images, args.device))
        print(f"repeat {r}: " + "  ".join(f"{head} {rates[head]['train'][-1]:.0f}/{rates[head]['embed'][-1]:.0f}"
                                          for head in args.heads) + "  (train/embed img/s)")
    medians = {head: {kind: statistics.median(v) for kind, v in kinds.items()} for head, kinds in rates.items()}
    parameters = {head: sum(p.numel() for p in models[head][0].parameters()) for head in args.heads}
    print(f"{'head':>8} {'params':>10} {'train img/s':>12} {'vs gem':>7} {'embed img/s':>12} {'vs gem':>7}"
          f"   (medians of {args.repeats})")
    for head in args.heads:
        m, g = medians[head], medians["gem"]
        print(f"{head:>8} {parameters[head]:>10,} {m['train']:>12.0f} {m['train'] / g['train']:>7.2f} "
              f"{m['embed']:>12.0f} {m['embed'] / g['embed']:>7.2f}")
    return medians


if __name__ == "__main__":
    main()
