"""Memory of the image cache: memory-mapped (today's cache) vs held in RAM (the former single .npz).

    python experiments/benchmarks/cache_memory.py [--images 3000] [--size 96 128] [--steps 300] [--batch 64]
        [--release-every 2] [--workdir DIR]

Writes --images random-ish JPEGs (256x192) as a dataset under a temporary folder, builds the image
cache with `load_images` (decoded straight into the cache's .npy files), then runs the same loop in
three fresh processes, one after the other:
  * memmap: the cache opened as `load_images` opens it on a hit (`io_utils.cached_arrays`, copy-on-write
    memmaps; a fill that would decode raises, so it must be a hit);
  * released: the same memmap, with `io_utils.release_mapped_pages` every --release-every steps, as the
    training batches and the embedding loop do (there: at most once a second, i.e. every 2-3 CPU steps);
  * in RAM: the same arrays read fully into memory (`np.load` without mmap), as the .npz cache did.
Each gathers --steps random batches of --batch database images (`db[idx]`, the gather `take` does on the
tensors that `torch.from_numpy` makes of these arrays) and converts them to float32, like a training step.

Reported per process (Linux /proc/self/status): peak RSS (VmHWM), peak anonymous RSS (RssAnon, sampled
after every step) and what it grew by over the process before the cache was opened, file-backed RSS at
the end (RssFile), and ms per step. Pages of a memory-mapped cache count in RSS once touched, but they
are clean page-cache pages that the kernel can drop at any time under memory pressure (and shares between
processes, e.g. DDP ranks); anonymous memory cannot be dropped, so it is what must fit in RAM. With random
batches over a few hundred steps nearly every page is touched, so peak RSS is about the same both ways
here; the anonymous memory is not. Releasing the mapped pages keeps peak RSS to the working set too. The
ratios printed are measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = "--child"


def status_kib() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in KiB (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def child(mode: str, cache: Path, shape: tuple[int, ...], steps: int, batch: int, seed: int,
          release_every: int) -> None:
    """One measured process: open the cache (memmap) or load it (in RAM), then gather random batches."""
    from siamese_retrieval.io_utils import cached_arrays, release_mapped_pages

    before = status_kib()
    t = time.perf_counter()
    if mode in ("memmap", "released"):
        def must_hit(out: dict) -> None:
            raise RuntimeError(f"{cache} is not a valid cache")

        db = cached_arrays(cache, {"db": (shape, np.uint8)}, "image", must_hit)["db"]
    else:
        db = np.load(cache / "db.npy")
    opened = time.perf_counter() - t
    rng = np.random.default_rng(seed)
    peak_anon, checksum = status_kib()["RssAnon"], 0.0
    t = time.perf_counter()
    for step in range(steps):
        x = db[rng.integers(0, shape[0], batch)].astype(np.float32) / 255.0
        if mode == "released" and step % release_every == release_every - 1:
            release_mapped_pages(force=True)
        checksum += float(x.mean())
        peak_anon = max(peak_anon, status_kib()["RssAnon"])
    per_step = (time.perf_counter() - t) / steps
    end = status_kib()
    print(json.dumps({"mode": mode, "type": type(db).__name__, "open_s": opened, "ms_per_step": 1e3 * per_step,
                      "base_anon_kib": before["RssAnon"], "peak_anon_kib": peak_anon, "hwm_kib": end["VmHWM"],
                      "file_kib": end["RssFile"], "checksum": checksum}))


def write_images(root: Path, n: int, seed: int) -> list[str]:
    """n smooth random colour fields with noise, 256x192 JPEG (decode and resize cost like photos)."""
    import cv2

    rng = np.random.default_rng(seed)
    (root / "database").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = cv2.resize(small, (256, 192), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        rel = f"database/{i:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", img)
        assert ok
        buf.tofile(str(root / rel))
        paths.append(rel)
    return paths


def make_dataset(root: Path, n: int, seed: int):
    from siamese_retrieval.data.dataset import read_dataset, write_dataset

    db = write_images(root, n, seed)
    q = db[:8]  # a few queries (the cache holds them too); the benchmark gathers database images
    loc = np.zeros((n, 3))
    write_dataset(root, db, loc, q, loc[:8], np.zeros((8, n), bool), np.zeros((8, n), np.float32))
    return read_dataset(root, check="none")


def run_child(mode: str, cache: Path, shape: tuple[int, ...], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, CHILD, mode, str(cache), ",".join(map(str, shape)), str(args.steps),
           str(args.batch), str(args.seed), str(args.release_every)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--release-every", type=int, default=2, help="released mode: unmap the pages every N steps")
    ap.add_argument("--workdir", default=None, help="folder for the images and the cache (default: a temporary one)")
    args = ap.parse_args()
    from siamese_retrieval.data.images import images_cache_file, load_images

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t = time.perf_counter()
        ds = make_dataset(Path(tmp) / "ds", args.images, args.seed)
        written = time.perf_counter() - t
        t = time.perf_counter()
        db, _ = load_images(ds, tuple(args.size), Path(tmp) / "cache")
        built = time.perf_counter() - t
        cache, shape = images_cache_file(ds, tuple(args.size), Path(tmp) / "cache"), db.shape
        del db
        mib = int(np.prod(shape)) / 2**20
        print(f"{args.images} database images -> uint8 {shape}: {mib:.1f} MiB; JPEGs written in {written:.1f} s, "
              f"cache built in {built:.1f} s ({os.cpu_count()} CPUs); {args.steps} random batches of {args.batch}")
        results = [run_child(mode, cache, shape, args) for mode in ("memmap", "released", "ram")]
    print(f"{'mode':>8} {'array':>8} {'open s':>7} {'peak RSS':>9} {'peak anon':>10} {'anon growth':>12} "
          f"{'file RSS':>9} {'ms/step':>8}   (MiB)")
    for r in results:
        growth = (r["peak_anon_kib"] - r["base_anon_kib"]) / 1024
        print(f"{r['mode']:>8} {r['type']:>8} {r['open_s']:>7.3f} {r['hwm_kib'] / 1024:>9.1f} "
              f"{r['peak_anon_kib'] / 1024:>10.1f} {growth:>12.1f} {r['file_kib'] / 1024:>9.1f} "
              f"{r['ms_per_step']:>8.3f}")
    mm, released, ram = results
    for r in (mm, released):
        assert abs(r["checksum"] - ram["checksum"]) < 1e-6 * max(1.0, abs(ram["checksum"])), "different pixels"
    growth = [(r["peak_anon_kib"] - r["base_anon_kib"]) for r in (mm, ram)]
    print(f"memmap vs in RAM: peak anonymous RSS {mm['peak_anon_kib'] / ram['peak_anon_kib']:.3f}x, its growth "
          f"{growth[0] / max(growth[1], 1):.4f}x, peak RSS {mm['hwm_kib'] / ram['hwm_kib']:.2f}x, "
          f"time per step {mm['ms_per_step'] / ram['ms_per_step']:.2f}x")
    print(f"released memmap vs in RAM: peak RSS {released['hwm_kib'] / ram['hwm_kib']:.3f}x, file RSS at the end "
          f"{released['file_kib'] / 1024:.1f} MiB, time per step {released['ms_per_step'] / ram['ms_per_step']:.2f}x")
    per_image = int(np.prod(shape[1:]))
    print(f"at 100k images of this size the in-RAM way needs {1e5 * per_image / 2**30:.2f} GiB of anonymous memory; "
          f"the memmap way's growth ({growth[0] / 1024:.1f} MiB here) is the batches' working set, whatever the "
          f"number of images")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        mode, cache, shape, steps, batch, seed, release_every = sys.argv[2:9]
        child(mode, Path(cache), tuple(int(s) for s in shape.split(",")), int(steps), int(batch), int(seed),
              int(release_every))
    else:
        main()
