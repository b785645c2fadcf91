"""Stress sets for re-ranking, made from the real photographs scikit-image ships (no download).

    python experiments/beat_verification/stress_sets.py OUT_DIR      # OUT_DIR/repetitive, OUT_DIR/viewpoint
    python evaluate.py ckpt_path=... data=msls_city data.root=OUT_DIR/repetitive split=all rerank=fused

Two datasets in the project's on-disk contract (database.json, query.json, gt.h5), one query per place:

* `repetitive`: each place is a wall of one repetitive texture (a real brick wall, a printed page, coins,
  a rendered checkerboard or window grid) with a small distinctive patch cut from another real photograph.
  A query is its place under a moderate perspective change and a lighting change. Places of one texture are
  look-alikes: RANSAC finds a consistent homography on the periodic part between different places, so
  inliers alone pick wrong places, while the distinctive patch tells them apart to a global descriptor.
* `viewpoint`: each place is a crop of a textured real photograph (astronaut, coffee, cat, rocket, motorcycle,
  Hubble deep field, tissue, camera man, retina) and its query the same crop under a strong viewpoint change
  (rotation up to 35 degrees, scale 0.7-1.4, perspective) and a lighting change. Other crops of the same
  photographs are distractors. A descriptor trained on a synthetic street city often misses here; matching
  local features finds the place.

Ground truth: sim = fov = 1 for the query's own place, 0 elsewhere. Everything is drawn from one seed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import cv2
import numpy as np

from siamese_retrieval.data.dataset import write_dataset

W, H = 320, 240  # image size (the ORB re-rankers resize to 240-640 px anyway)
REPETITIVE = ("brick.png", "page.png", "coins.png", "checkerboard", "windows", "text.png")
DISTINCT = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "ihc.png",
            "hubble_deep_field.jpg", "retina.jpg", "color.png", "logo.png")
TEXTURED = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
            "hubble_deep_field.jpg", "ihc.png", "camera.png", "retina.jpg", "coins.png")


def photo_dir() -> Path:
    """scikit-image's data folder, found without importing scikit-image (the dev extra installs it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the stress sets are cut from scikit-image's photographs: pip install scikit-image")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def photo(name: str) -> np.ndarray:
    """A shipped photograph as BGR uint8 (alpha dropped, grey expanded)."""
    image = cv2.imread(str(photo_dir() / name), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SystemExit(f"error: {photo_dir() / name}: cannot be read")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image[..., :3].copy()


def rendered(name: str, rng: np.random.Generator) -> np.ndarray:
    """A checkerboard or a facade of identical windows, at a random period."""
    canvas = np.full((2 * H, 2 * W, 3), 200, np.uint8)
    if name == "checkerboard":
        s = int(rng.integers(18, 34))
        y, x = np.mgrid[: 2 * H, : 2 * W]
        canvas[((y // s + x // s) % 2) == 1] = 30
        return canvas
    canvas[:] = (150, 170, 190)  # a plastered wall with a grid of framed windows
    sx, sy = int(rng.integers(40, 60)), int(rng.integers(50, 70))
    for y0 in range(10, 2 * H - sy, sy):
        for x0 in range(10, 2 * W - sx, sx):
            cv2.rectangle(canvas, (x0, y0), (x0 + sx // 2, y0 + sy // 2), (60, 50, 40), -1)
            cv2.rectangle(canvas, (x0, y0), (x0 + sx // 2, y0 + sy // 2), (240, 240, 240), 3)
            cv2.line(canvas, (x0 + sx // 4, y0), (x0 + sx // 4, y0 + sy // 2), (240, 240, 240), 2)
    return canvas


def crop(image: np.ndarray, rng: np.random.Generator, frac: float = 0.6) -> np.ndarray:
    """A random crop of `frac` of the shorter side, resized to W x H."""
    h, w = image.shape[:2]
    side_h = int(min(h, w * H / W) * frac)
    side_w = int(side_h * W / H)
    y, x = int(rng.integers(0, h - side_h + 1)), int(rng.integers(0, w - side_w + 1))
    return cv2.resize(image[y : y + side_h, x : x + side_w], (W, H), interpolation=cv2.INTER_AREA)


def tiled(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A texture photograph tiled (mirrored) to fill the frame at a random scale: a wall of it."""
    scale = float(rng.uniform(0.5, 0.9))
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    reps = (int(np.ceil(2 * H / small.shape[0])) + 1, int(np.ceil(2 * W / small.shape[1])) + 1)
    big = np.tile(small, (reps[0], reps[1], 1))
    return crop(big, rng, frac=0.5)


def view_change(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """The same scene from elsewhere: a homography (rotation, scale, perspective) and a lighting change."""
    angle = np.deg2rad(rng.uniform(-35, 35) * strength)
    scale = float(np.exp(rng.uniform(-np.log(1.4), np.log(1.4)) * strength))
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    center = np.array([W / 2, H / 2])
    a = np.array([[c, -s], [s, c]])
    t = center - a @ center + rng.uniform(-0.08, 0.08, 2) * [W, H] * strength
    h = np.eye(3)
    h[:2, :2], h[:2, 2] = a, t
    h[2, :2] = rng.uniform(-6e-4, 6e-4, 2) * strength  # perspective
    warped = cv2.warpPerspective(image, h, (W, H), borderMode=cv2.BORDER_REFLECT)
    gain = rng.uniform(0.9, 1.1, 3) * rng.uniform(0.6, 1.2)  # exposure, and a slight colour cast
    lit = warped.astype(np.float32) * gain + rng.normal(0, 4, warped.shape)
    return np.clip(lit, 0, 255).astype(np.uint8)


def with_patch(wall: np.ndarray, patch_source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The wall with a distinctive patch (a sign, a shop window) of about a fifth of its area."""
    pw, ph = int(W * 0.42), int(H * 0.42)
    patch = cv2.resize(crop(patch_source, rng, frac=0.5), (pw, ph), interpolation=cv2.INTER_AREA)
    out = wall.copy()
    y, x = int(rng.integers(0, H - ph)), int(rng.integers(0, W - pw))
    out[y : y + ph, x : x + pw] = patch
    return out


def write_set(root: Path, db: list[np.ndarray], queries: list[np.ndarray], place_of_query: list[int]) -> Path:
    """The contract files: db_<i>.png / q_<i>.png, one place per database image, sim = fov = own place."""
    root.mkdir(parents=True, exist_ok=True)
    for kind, images in (("db", db), ("q", queries)):
        for i, image in enumerate(images):
            cv2.imwrite(str(root / f"{kind}_{i:04d}.png"), image)
    sim = np.zeros((len(queries), len(db)), bool)
    sim[np.arange(len(queries)), place_of_query] = True
    loc = lambda idx: np.stack([np.asarray(idx, float) * 100.0, np.zeros(len(idx))], 1)  # places 100 m apart
    return write_dataset(root, [f"db_{i:04d}.png" for i in range(len(db))], loc(range(len(db))),
                         [f"q_{i:04d}.png" for i in range(len(queries))], loc(place_of_query), sim,
                         sim.astype(np.float32))


def repetitive_set(root: Path, places_per_texture: int = 5, seed: int = 0) -> Path:
    """Places of repetitive walls with a distinctive patch each; the look-alikes share the wall."""
    rng = np.random.default_rng(seed)
    distinct = [photo(n) for n in DISTINCT]
    db, queries, owner = [], [], []
    for name in REPETITIVE:
        texture = rendered(name, rng) if name in ("checkerboard", "windows") else photo(name)
        wall = tiled(texture, rng) if name not in ("checkerboard", "windows") else crop(texture, rng, 0.5)
        for _ in range(places_per_texture):
            place = with_patch(wall, distinct[int(rng.integers(len(distinct)))], rng)
            owner.append(len(db))
            db.append(place)
            queries.append(view_change(place, rng, strength=0.45))
    return write_set(root, db, queries, owner)


def viewpoint_set(root: Path, places_per_photo: int = 4, distractors_per_photo: int = 4, seed: int = 0) -> Path:
    """Crops of textured photographs under strong viewpoint changes, among other crops of the same photos."""
    rng = np.random.default_rng(seed)
    db, queries, owner = [], [], []
    for name in TEXTURED:
        image = photo(name)
        for i in range(places_per_photo + distractors_per_photo):
            place = crop(image, rng, frac=float(rng.uniform(0.35, 0.6)))
            if i < places_per_photo:
                owner.append(len(db))
                queries.append(view_change(place, rng, strength=1.0))
            db.append(place)
    left, right = photo("motorcycle_left.png"), photo("motorcycle_right.png")  # a real stereo pair
    for frac in (0.9, 0.7):
        y0 = int((left.shape[0] - left.shape[0] * frac) / 2)
        x0 = int((left.shape[1] - left.shape[1] * frac) / 2)
        box = (slice(y0, y0 + int(left.shape[0] * frac)), slice(x0, x0 + int(left.shape[1] * frac)))
        owner.append(len(db))
        db.append(cv2.resize(left[box], (W, H), interpolation=cv2.INTER_AREA))
        queries.append(cv2.resize(right[box], (W, H), interpolation=cv2.INTER_AREA))
    return write_set(root, db, queries, owner)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="writes OUT/repetitive and OUT/viewpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, make in (("repetitive", repetitive_set), ("viewpoint", viewpoint_set)):
        root = make(args.out / name, seed=args.seed)
        print(f"{name}: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
