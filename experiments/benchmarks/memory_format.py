"""PlainCNN in NHWC (channels_last) vs NCHW memory layout, in one run: training steps and embedding throughput.

    python experiments/benchmarks/memory_format.py [--repeats 5 --steps 10] [--model cnn_snn] [--device cpu|cuda]
        [--override model.inputs.height=192 ...]

Builds the encoder of `model=<--model>` from the training config twice, identical weights, once with
`channels_last: true` and once with false, and times on the same random uint8 batches, interleaved
(NHWC, NCHW, NCHW, NHWC, ...) --repeats times:
  * train: --steps steps of forward + squared-norm loss + backward + AdamW step on batch_size x 2 images
    (a pair batch's two sides; the loss is a stand-in: its cost is nil next to the network's);
  * embed: no-grad forward of --embed-images images in batches of 256 (what evaluation and look-alike mining do).
Printed: per repeat and the medians of images/s for both layouts and the ratio NHWC / NCHW (> 1: channels_last is
faster), and the largest difference between the two layouts' embeddings (float rounding only).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn_snn", help="a conf/model config with a PlainCNN encoder")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per measurement (after 2 warm-up)")
    ap.add_argument("--embed-images", type=int, default=1024)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    return ap.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module, int, int, int]:
    """The encoder in both layouts with the same weights, and the images' (batch, height, width)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={args.model}", *args.override])
    enc_cfg = cfg.model.module.encoder
    torch.manual_seed(0)
    nhwc = instantiate(enc_cfg, channels_last=True)
    nchw = instantiate(enc_cfg, channels_last=False)
    nchw.load_state_dict(nhwc.state_dict())
    return nhwc.to(args.device), nchw.to(args.device), 2 * int(cfg.model.batch_size), cfg.model.inputs.height, \
        cfg.model.inputs.width


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_rate(model: torch.nn.Module, images: torch.Tensor, steps: int, device: str) -> float:
    """Images/s of forward + backward + AdamW over `steps` steps, after 2 untimed ones."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for i in range(steps + 2):
        if i == 2:
            sync(device)
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model({"image": images}).pow(2).sum().backward()
        opt.step()
    sync(device)
    return steps * len(images) / (time.perf_counter() - start)


@torch.no_grad()
def embed_rate(model: torch.nn.Module, images: torch.Tensor, device: str) -> float:
    model.eval()
    model({"image": images[:256]})  # warm-up
    sync(device)
    start = time.perf_counter()
    for s in range(0, len(images), 256):
        model({"image": images[s : s + 256]})
    sync(device)
    return len(images) / (time.perf_counter() - start)


def check_device(device: str) -> None:
    """--device cuda on a machine without one: one line, not a traceback from the first tensor moved there."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_device(args.device)
    nhwc, nchw, batch, h, w = build(args)
    gen = torch.Generator().manual_seed(0)
    train_images = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=gen).to(args.device)
    embed_images = torch.randint(0, 256, (args.embed_images, 3, h, w), dtype=torch.uint8, generator=gen)
    embed_images = embed_images.to(args.device)
    with torch.no_grad():
        a, b = copy.deepcopy(nhwc).eval(), copy.deepcopy(nchw).eval()
        max_diff = (a({"image": embed_images[:64]}) - b({"image": embed_images[:64]})).abs().max().item()
    print(f"model={args.model} {batch} images {h}x{w} per step, device={args.device}, "
          f"threads={torch.get_num_threads()}, torch {torch.__version__}")
    rates: dict[str, dict[str, list[float]]] = {k: {"NHWC": [], "NCHW": []} for k in ("train", "embed")}
    for r in range(args.repeats):
        order = [("NHWC", nhwc), ("NCHW", nchw)] if r % 2 == 0 else [("NCHW", nchw), ("NHWC", nhwc)]
        for name, model in order:
            rates["train"][name].append(train_rate(model, train_images, args.steps, args.device))
            rates["embed"][name].append(embed_rate(model, embed_images, args.device))
        print(f"repeat {r}: " + "  ".join(
            f"{k} {n} {rates[k][n][-1]:.0f} img/s" for k in ("train", "embed") for n in ("NHWC", "NCHW")))
    for kind in ("train", "embed"):
        med = {n: statistics.median(v) for n, v in rates[kind].items()}
        print(f"{kind}: NHWC {med['NHWC']:.0f} img/s, NCHW {med['NCHW']:.0f} img/s (medians of {args.repeats}); "
              f"ratio NHWC/NCHW {med['NHWC'] / med['NCHW']:.2f}")
    print(f"largest embedding difference between the layouts (same weights): {max_diff:.2e}")


if __name__ == "__main__":
    main()
