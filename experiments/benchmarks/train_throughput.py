"""Training throughput, in one run: a full training step through Lightning vs the same model's compute-only step.

    python experiments/benchmarks/train_throughput.py [--steps 20 --warmup 5 --repeats 3] [--device cpu|cuda]
        [--threads N] [--override data=synth_tiny ...] [--json PATH]

Composes the training config (`train.yaml`, `model=cnn_snn` unless an `--override model=...` says otherwise;
`--device cuda` adds `trainer=gpu` unless an `--override trainer=...` is given) and builds the datamodule and the
model as train.py does. Building the dataset, its image cache (the default city and cnn_snn's training-only
views are rendered and decoded on first use) and each Trainer is not timed. Then, --repeats times, interleaved
(full then compute-only, then compute-only then full, ...):

  * full: `Trainer.fit` on the real train dataloader for --warmup + --steps steps (no logger, no checkpointing,
    no validation, no progress bar or model summary; max_steps stops it). A callback stamps
    `time.perf_counter()` at every `on_train_batch_start` / `on_train_batch_end`; the timed window runs from the
    end of the last warm-up step to the end of the last step, so it holds everything a training step costs in
    Lightning: fetching the batch (pair slicing from the image cache, the in-batch relevance lookup), the transfer
    to the device, the augmentation (`on_after_batch_transfer`), training_step + backward + optimizer step, and
    the loop's own bookkeeping (`self.log`, hooks).
  * compute-only: the same model class built afresh with the same seed and the optimizer of its
    `configure_optimizers`, on batches taken from the same dataloader before timing (the first warm-up + steps
    batches, at most --max-preload, reused in a cycle) and moved to the device. Each step: the datamodule's
    augmentation of both sides (`inputs.augment`, what its `on_after_batch_transfer` does on the device: it is
    model-side compute in both paths, so both include it), zero_grad, `module.training_step(batch, i)` (its
    `self.log` calls are no-ops without a trainer), backward, optimizer.step. Under 16-mixed / bf16-mixed the
    step runs in the same autocast as Lightning's precision plugin (16-mixed: with a GradScaler).

Images per step are counted from the batch (both sides of every pair: 2 x batch_size for full batches). CUDA is
synchronised before each of the two timestamps that bound a timed window (not per step). Printed: per repeat
and the medians of images/s for both, and the ratio compute-only / full (1.0: the data path and Lightning add
nothing), checked against the issue's goal (<= 1.15 on CPU, <= 2 on a GPU). Diagnostics, medians over the
timed steps of the full path: the time between two steps (fetch + transfer + augmentation + loop) and inside a
step (on_train_batch_start -> end; on a GPU these are host-side times), the dataloader alone (ms per batch while
preloading) and the augmentation alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[2]
GOALS = {"cpu": 1.15, "cuda": 2.0}  # the target: compute-only / full images/s at most this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before them (>= 1)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measurements of each path, interleaved: full, compute, compute, full, ...")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override of train.yaml (repeatable), e.g. data=synth_tiny, model.batch_size=64")
    ap.add_argument("--max-preload", type=int, default=64,
                    help="compute-only: batches held on the device at most (cycled when steps need more)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1 or args.max_preload < 1:
        ap.error("--steps, --warmup, --repeats and --max-preload must be >= 1")
    return args


# ----------------------------------------------------------------------------------------- config


def compose_config(device: str, overrides: list[str], output_dir: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    groups = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    base = [] if "model" in groups else ["model=cnn_snn"]
    if device == "cuda" and "trainer" not in groups:
        base.append("trainer=gpu")
    # nothing is written: no logger, no checkpoints; output_dir only resolves ${paths.output_dir} (normally Hydra's)
    fixed = ["logger=none", f"paths.output_dir={output_dir}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*base, *overrides, *fixed])


# ----------------------------------------------------------------------------------------- helpers


def count_images(batch: dict[str, Any]) -> int:
    """Images in a batch: a place batch's images, or a pair batch's query rows plus its database rows."""
    n = 0
    for side in ("images",) if "images" in batch else ("q", "d"):
        tensors = batch[side]
        n += int(next(iter(tensors.values())).shape[0]) if isinstance(tensors, dict) else int(tensors.shape[0])
    return n


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepTimes(pl.Callback):
    """Stamps time.perf_counter() at every step's start and end, and counts each batch's images."""

    def __init__(self, device: str, window: tuple[int, int]) -> None:
        self.device, self.window = device, window  # the steps whose ends bound the timed window
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.images: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        self.images.append(count_images(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(self.ends) in self.window:  # synchronise at the two ends of the timed window only, not per step
            synchronize(self.device)
        self.ends.append(time.perf_counter())


def autocast_context(precision: str, device: str):
    """The autocast Lightning's precision plugin runs training_step under, and whether it scales the loss."""
    p = str(precision)
    if p in ("32-true", "32", "64-true", "64"):
        return contextlib.nullcontext, False
    if p in ("16-mixed", "16"):
        if device != "cuda":
            raise SystemExit("precision 16-mixed needs --device cuda (use bf16-mixed on CPU)")
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), True
    if p in ("bf16-mixed", "bf16"):
        return (lambda: torch.autocast(device, dtype=torch.bfloat16)), False
    raise SystemExit(f"precision {p!r} is not supported by this benchmark")


def first_optimizer(configured: Any):
    """The optimizer out of whatever configure_optimizers returned."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return configured["optimizer"]
    if isinstance(configured, (list, tuple)):
        return first_optimizer(configured[0])
    raise TypeError(f"cannot find the optimizer in {type(configured).__name__}")


# ----------------------------------------------------------------------------------------- the two paths


def full_step(cfg, datamodule, args, precision: str) -> dict[str, Any]:
    """One measurement through Trainer.fit: images/s over the timed window, and the step-time split."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model = instantiate(cfg.model.module, _recursive_=False)
    w, n = args.warmup, args.steps
    timer = StepTimes(args.device, (w - 1, w + n - 1))
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=[timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, max_steps=w + n, max_epochs=-1,
        accelerator="gpu" if args.device == "cuda" else "cpu", precision=precision,
    )
    trainer.fit(model, datamodule=datamodule)
    if len(timer.ends) < w + n:
        raise RuntimeError(f"the fit ran {len(timer.ends)} steps, {w + n} were asked")
    seconds = timer.ends[w + n - 1] - timer.ends[w - 1]
    images = sum(timer.images[w : w + n])
    between = [timer.starts[i] - timer.ends[i - 1] for i in range(w, w + n)]
    inside = [timer.ends[i] - timer.starts[i] for i in range(w, w + n)]
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "ms_between_steps": 1e3 * statistics.median(between), "ms_in_step": 1e3 * statistics.median(inside)}


def preload(datamodule, count: int, device: str) -> tuple[list[dict[str, Any]], list[float]]:
    """The first `count` training batches (epoch 0, as the fit sees them), on the device; ms to fetch each."""
    from pytorch_lightning.utilities import move_data_to_device

    batches, fetch_ms = [], []
    while len(batches) < count:
        it = iter(datamodule.train_dataloader())
        while len(batches) < count:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            fetch_ms.append(1e3 * (time.perf_counter() - t))
            batches.append(move_data_to_device(batch, device))
    synchronize(device)
    return batches, fetch_ms


def augment(datamodule, batch: dict[str, Any]) -> dict[str, Any]:
    """What RetrievalDataModule.on_after_batch_transfer does to a training batch."""
    if "images" in batch:  # a P x K place batch (cnn_snn's default): one set of images
        return {**batch, "images": datamodule.inputs.augment(batch["images"])}
    return {**batch, "q": datamodule.inputs.augment(batch["q"]), "d": datamodule.inputs.augment(batch["d"])}


def compute_only(cfg, datamodule, batches: list[dict[str, Any]], args, precision: str) -> dict[str, Any]:
    """One measurement of the model's compute alone on pre-loaded device batches (augmentation included)."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = instantiate(cfg.model.module, _recursive_=False).to(args.device)
    module.train()
    # configure_optimizers reads trainer.max_epochs (the cosine schedule's T_max); the schedule steps per epoch,
    # never within the timed steps, so only the optimizer is used
    module.trainer = SimpleNamespace(max_epochs=1)
    try:
        optimizer = first_optimizer(module.configure_optimizers())
    finally:
        module.trainer = None
    autocast, scaled = autocast_context(precision, args.device)
    scaler = torch.amp.GradScaler("cuda") if scaled else None
    w, n = args.warmup, args.steps
    images, start = 0, 0.0
    for i in range(w + n):
        if i == w:
            synchronize(args.device)
            start = time.perf_counter()
        batch = augment(datamodule, batches[i % len(batches)])
        if i >= w:
            images += count_images(batch)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = module.training_step(batch, i)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    synchronize(args.device)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def augment_alone_ms(datamodule, batches: list[dict[str, Any]], device: str) -> float:
    """Median ms of the augmentation of one batch (both sides), synchronised per batch."""
    augment(datamodule, batches[0])  # warm-up: first-call allocations
    times = []
    for batch in batches[: min(len(batches), 20)]:
        synchronize(device)
        t = time.perf_counter()
        augment(datamodule, batch)
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))  # data_cache/ in the checkout, as the root train.py does
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")

    from siamese_retrieval.data.datamodule import build_datamodule
    from siamese_retrieval.run_outputs import quiet_known_warnings

    quiet_known_warnings()
    warnings.filterwarnings("ignore", message=".*self.log\\(\\)` but the `self.trainer` reference")  # compute-only
    warnings.filterwarnings("ignore", message=".*GPU available but not used")
    warnings.filterwarnings("ignore", message=".*`max_epochs` was not set")

    with tempfile.TemporaryDirectory(prefix="train_throughput-") as out_dir:
        cfg = compose_config(args.device, args.override, out_dir)
        precision = str(cfg.trainer.get("precision", "32-true"))
        if args.device == "cpu" and precision in ("16-mixed", "16"):
            raise SystemExit("precision 16-mixed is for --device cuda; on CPU use trainer.precision=bf16-mixed")

        t = time.perf_counter()
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        datamodule = build_datamodule(cfg.data, instantiate(cfg.model.inputs))
        datamodule.prepare_data()
        datamodule.setup("fit")
        n_preload = min(args.warmup + args.steps, args.max_preload)
        batches, fetch_ms = preload(datamodule, n_preload, args.device)  # before any fit: epoch 0's batches
        setup_s = time.perf_counter() - t
        aug_ms = augment_alone_ms(datamodule, batches, args.device)

        device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
        print(f"model {cfg.model.name}, data {cfg.data.name}, batch {datamodule.batch_size} pairs, device "
              f"{args.device} ({device_name}), precision {precision}, torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs")
        print(f"data + image cache + {len(batches)} batches preloaded in {setup_s:.1f} s (not timed); "
              f"{args.warmup} warm-up + {args.steps} timed steps per measurement, {args.repeats} repeats "
              f"(interleaved, alternating which goes first); augmentation included in both paths")

        full, compute = [], []
        for r in range(args.repeats):
            # alternate which path goes first (full, compute | compute, full | ...): a drift of the machine's
            # speed during the run then favours neither
            for path in ("full", "compute") if r % 2 == 0 else ("compute", "full"):
                if path == "full":
                    full.append(full_step(cfg, datamodule, args, precision))
                else:
                    compute.append(compute_only(cfg, datamodule, batches, args, precision))
            f, c = full[-1], compute[-1]
            print(f"repeat {r + 1}: full {f['images_per_s']:8.1f} images/s   compute-only {c['images_per_s']:8.1f} "
                  f"images/s   ratio {c['images_per_s'] / f['images_per_s']:.3f}   (full: "
                  f"{f['ms_between_steps']:.1f} ms between steps, {f['ms_in_step']:.1f} ms in a step)", flush=True)

    full_ips = statistics.median(r["images_per_s"] for r in full)
    compute_ips = statistics.median(r["images_per_s"] for r in compute)
    ratio = compute_ips / full_ips
    goal = GOALS[args.device]
    between = statistics.median(r["ms_between_steps"] for r in full)
    inside = statistics.median(r["ms_in_step"] for r in full)
    fetch_median = statistics.median(fetch_ms[1:]) if len(fetch_ms) > 1 else fetch_ms[0]
    print(f"{'path':>14} {'images/s':>10} {'ms/step':>9}   (medians of {args.repeats})")
    step_images = statistics.median(r["images"] / args.steps for r in full)
    for name, ips in (("full", full_ips), ("compute-only", compute_ips)):
        print(f"{name:>14} {ips:>10.1f} {1e3 * step_images / ips:>9.1f}")
    print(f"ratio compute-only / full: {ratio:.3f}  (1.0 = no data-path overhead)")
    print(f"full step split: {between:.1f} ms between steps (fetch + transfer + augmentation + loop) + {inside:.1f} ms "
          f"in the step; dataloader alone {fetch_median:.1f} ms/batch (first batch of the epoch "
          f"{fetch_ms[0]:.1f} ms: the epoch's pairs), augmentation alone {aug_ms:.1f} ms/batch")
    verdict = "PASS" if ratio <= goal else "FAIL"
    print(f"goal ({args.device}): ratio <= {goal:g}: {verdict}")

    result = {
        "model": str(cfg.model.name), "data": str(cfg.data.name), "device": args.device, "device_name": device_name,
        "precision": precision, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "batch_pairs": int(datamodule.batch_size), "overrides": list(args.override), "steps": args.steps,
        "warmup": args.warmup, "repeats": args.repeats, "preloaded_batches": len(batches),
        "augmentation_in_both": True,
        "full": full, "compute_only": compute,
        "full_images_per_s": full_ips, "compute_images_per_s": compute_ips, "ratio": ratio,
        "goal": goal, "pass": ratio <= goal,
        "diagnostics": {"full_ms_between_steps": between, "full_ms_in_step": inside,
                        "dataloader_ms_per_batch": fetch_median, "dataloader_first_batch_ms": fetch_ms[0],
                        "augment_ms_per_batch": aug_ms, "setup_s": setup_s},
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
