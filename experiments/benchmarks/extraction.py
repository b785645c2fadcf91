"""Keypoint extraction: scikit-image ORB (the study's extractor) vs the framework's OpenCV ORB.

    python experiments/benchmarks/extraction.py [--preset tiny|default] [--cache-dir data_cache] [--repeats 3]

Both extract the study's 10 keypoints per image from the synthetic city's database + query JPEGs:
  * scikit-image: decode (skimage.io) -> rgb2gray -> `skimage.feature.ORB(n_keypoints=10)`
    .detect_and_extract, as the study did (optional dependency: pip install scikit-image);
    2 workers = 2 processes (its detector holds the GIL in Python code, threads do not scale);
  * framework: `siamese_retrieval.data.keypoints.extract_paths` (OpenCV, decode included);
    2 workers = 2 threads (OpenCV releases the GIL).
Images/second are medians over --repeats; the ratios printed are measured in this run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.keypoints import OrbConfig, extract_paths
from siamese_retrieval.data.synth import SynthConfig, ensure_city


def skimage_chunk(paths: list[str]) -> int:
    import warnings

    from skimage.color import rgb2gray
    from skimage.feature import ORB
    from skimage.io import imread

    orb = ORB(n_keypoints=10)
    found = 0
    for p in paths:
        img = imread(p)
        gray = rgb2gray(img) if img.ndim == 3 else img
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                orb.detect_and_extract(gray)
            found += len(orb.keypoints)
        except RuntimeError:  # skimage raises when an image has no keypoint at all
            pass
    return found


def skimage_run(paths: list[str], workers: int, pool: ProcessPoolExecutor | None) -> int:
    if workers <= 1:
        return skimage_chunk(paths)
    chunks = [paths[i::workers * 4] for i in range(workers * 4)]
    return sum(pool.map(skimage_chunk, chunks))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="synthetic city preset (tiny: 160 images 128x96; default: ~1400 256x192)")
    ap.add_argument("--cache-dir", default=os.environ.get("SIAMESE_CACHE_DIR", "data_cache"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    args = ap.parse_args()
    root = ensure_city(args.cache_dir, SynthConfig.from_preset(args.preset), workers=1)
    ds = read_dataset(root, check="none")
    paths = [str(p) for p in ds.all_files()][: args.limit]
    print(f"{len(paths)} images of the {args.preset} synthetic city ({root}), 10 keypoints each, "
          f"{os.cpu_count()} CPUs, medians of {args.repeats}")
    rates = {}
    cfg = OrbConfig(n_keypoints=10)
    for workers in (1, 2):
        rates[("opencv", workers)] = len(paths) / timed(lambda: extract_paths(paths, cfg, workers=workers), args.repeats)
    try:
        import skimage  # noqa: F401
    except ImportError:
        print("scikit-image is not installed (pip install scikit-image): only OpenCV measured")
    else:
        with ProcessPoolExecutor(max_workers=2) as pool:
            list(pool.map(skimage_chunk, [paths[:2], paths[2:4]]))  # start the workers and import skimage there
            for workers in (1, 2):
                rates[("skimage", workers)] = len(paths) / timed(lambda: skimage_run(paths, workers, pool), args.repeats)
    print(f"{'extractor':>10} {'workers':>8} {'images/s':>10}")
    for (name, workers), rate in rates.items():
        print(f"{name:>10} {workers:>8} {rate:>10.1f}")
    for workers in (1, 2):
        if ("skimage", workers) in rates:
            print(f"opencv vs skimage, {workers} worker(s): {rates[('opencv', workers)] / rates[('skimage', workers)]:.0f}x")
    print(f"2 vs 1 workers: opencv {rates[('opencv', 2)] / rates[('opencv', 1)]:.2f}x"
          + (f", skimage {rates[('skimage', 2)] / rates[('skimage', 1)]:.2f}x" if ("skimage", 2) in rates else ""))


if __name__ == "__main__":
    main()
