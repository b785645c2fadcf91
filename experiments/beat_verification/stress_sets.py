"""Stress sets for re-ranking, made from the real photographs scikit-image ships (no download).

    python experiments/beat_verification/stress_sets.py OUT_DIR      # OUT_DIR/repetitive, OUT_DIR/viewpoint
    python evaluate.py ckpt_path=... data=msls_city data.root=OUT_DIR/repetitive split=all rerank=fused

Two datasets in the project's on-disk contract (database.json, query.json, gt.h5), one query per place:

* `repetitive`: the places of one texture share a stretch of a repetitive wall (a real brick wall, a printed
  page, coins, text, a rendered checkerboard or window grid) and each has its own coloured sign. A query is
  its place under a moderate perspective change and a lighting change. RANSAC verifies the other places of the
  query's wall too (tens of inliers each), so verification can pick a look-alike, while the sign's colour
  tells them apart to a global descriptor.
* `viewpoint`: each place is a crop of a textured real photograph (astronaut, coffee, cat, rocket, motorcycle,
  Hubble deep field, tissue, camera man, retina, coins) and its query the same crop under a strong viewpoint
  change (rotation up to 35 degrees, scale 0.7-1.4, perspective) and a lighting change; crops of disjoint parts
  of the same photographs are distractors. One more place is a real stereo pair (the motorcycle, left and right). A descriptor trained on a synthetic street city often misses here; matching
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
    """A texture photograph tiled to a large wall at a random scale; places crop different parts of it."""
    scale = float(rng.uniform(0.5, 0.9))
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    reps = (int(np.ceil(3 * H / small.shape[0])) + 1, int(np.ceil(3 * W / small.shape[1])) + 1)
    return np.tile(small, (reps[0], reps[1], 1))


def cells(image: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`n` crops of W x H aspect from disjoint cells of a grid over the image (no two share a pixel)."""
    h, w = image.shape[:2]
    rows = max(1, int(round(np.sqrt(n * h * W / (w * H)))))
    cols = int(np.ceil(n / rows))
    picked = rng.permutation(rows * cols)[:n]
    out = []
    for k in picked:
        r, c = divmod(int(k), cols)
        y0, y1, x0, x1 = r * h // rows, (r + 1) * h // rows, c * w // cols, (c + 1) * w // cols
        out.append(crop(image[y0:y1, x0:x1], rng, frac=1.0))
    return out


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


def sign(rng: np.random.Generator) -> np.ndarray:
    """A shop sign: a flat colour panel with a frame (colour tells places apart; it has few ORB corners)."""
    hue = int(rng.integers(0, 180))
    panel = np.zeros((int(H * 0.4), int(W * 0.4), 3), np.uint8)
    panel[:] = cv2.cvtColor(np.uint8([[[hue, 200, 220]]]), cv2.COLOR_HSV2BGR)[0, 0]
    cv2.rectangle(panel, (0, 0), (panel.shape[1] - 1, panel.shape[0] - 1), (40, 40, 40), 4)
    return panel


def repetitive_set(root: Path, places_per_texture: int = 5, seed: int = 0) -> Path:
    """Places on one stretch of a repetitive wall each, told apart by a coloured sign: the wall's matches verify
    every place of that wall about equally, so inliers alone cannot tell them apart."""
    rng = np.random.default_rng(seed)
    db, queries, owner = [], [], []
    for name in REPETITIVE:
        wall = rendered(name, rng) if name in ("checkerboard", "windows") else tiled(photo(name), rng)
        stretch = crop(wall, rng, frac=0.45)
        for _ in range(places_per_texture):
            place, panel = stretch.copy(), sign(rng)
            y, x = int(rng.integers(0, H - panel.shape[0])), int(rng.integers(0, W - panel.shape[1]))
            place[y : y + panel.shape[0], x : x + panel.shape[1]] = panel
            owner.append(len(db))
            db.append(place)
            queries.append(view_change(place, rng, strength=0.45))
    return write_set(root, db, queries, owner)


def viewpoint_set(root: Path, places_per_photo: int = 4, distractors_per_photo: int = 4, seed: int = 0) -> Path:
    """Crops of textured photographs (disjoint parts of each) under strong viewpoint changes."""
    rng = np.random.default_rng(seed)
    db, queries, owner = [], [], []
    for name in TEXTURED:
        for i, place in enumerate(cells(photo(name), places_per_photo + distractors_per_photo, rng)):
            if i < places_per_photo:
                owner.append(len(db))
                queries.append(view_change(place, rng, strength=1.0))
            db.append(place)
    left, right = photo("motorcycle_left.png"), photo("motorcycle_right.png")  # a real stereo pair
    owner.append(len(db))
    db.append(cv2.resize(left, (W, H), interpolation=cv2.INTER_AREA))
    queries.append(cv2.resize(right, (W, H), interpolation=cv2.INTER_AREA))
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
