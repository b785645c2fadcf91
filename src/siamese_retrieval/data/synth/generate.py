"""Generate the synthetic city in the dataset contract format, and cache it by its parameters.

    generate_city(out, cfg)   -> out (database/images, query/images, *.json, gt.h5, synth_config.json)
    ensure_city(cache_dir, cfg) -> cache_dir/synth-<hash>, generated only when missing
    (each query's condition is read back by data/conditions.py: query_conditions(root))

Every random draw comes from a generator seeded by (cfg.seed, purpose, street, index), so the
result does not depend on how streets are split over worker processes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from siamese_retrieval.data.conditions import CONFIG_FILE
from siamese_retrieval.data.dataset import fits_dense, write_dataset
from siamese_retrieval.data.ground_truth import SparseRelevance
from siamese_retrieval.data.synth.appearance import database_appearance, pick_condition, query_appearance
from siamese_retrieval.data.synth.config import SynthConfig, db_positions
from siamese_retrieval.data.synth.facades import build_street, make_archetypes
from siamese_retrieval.data.synth.geometry import Camera, camera_array, fov_pairs, street_width, world_loc
from siamese_retrieval.data.synth.render import SceneRenderer
from siamese_retrieval.io_utils import (
    atomic_write_json,
    check_cache_entry,
    make_temp_dir,
    publish_dir,
    safe_remove,
    stable_hash,
)
from siamese_retrieval.progress import progress


# ------------------------------------------------------------------------------------ planning


def plan_database(cfg: SynthConfig) -> list[Camera]:
    cams = []
    for s in cfg.streets:
        rng = np.random.default_rng([cfg.seed, 301, s])
        for x in db_positions(cfg):
            for yaw, lane in ((0.0, -cfg.db_lane_m), (180.0, cfg.db_lane_m)):
                cams.append(
                    Camera(
                        s,
                        float(x + rng.uniform(-0.3, 0.3)),
                        float(lane + rng.uniform(-1, 1) * cfg.db_lateral_jitter_m),
                        float(yaw + rng.uniform(-1, 1) * cfg.db_yaw_jitter_deg),
                    )
                )
    return cams


def plan_queries(cfg: SynthConfig) -> tuple[list[Camera], list[str]]:
    """Queries drive the same streets at other times: random positions, either direction, mostly
    in their lane but off the database's line (sometimes in the other lane), heading jittered
    (normal, clipped at +-query_yaw_jitter_deg), each with an appearance condition."""
    cams, conditions = [], []
    for s in cfg.streets:
        rng = np.random.default_rng([cfg.seed, 302, s])
        lateral = min(cfg.query_lateral_max_m, float(street_width(cfg, s)) / 2 - 1.0)
        for _ in range(cfg.queries_per_street):
            backward = rng.random() < 0.5
            lane = cfg.db_lane_m if backward else -cfg.db_lane_m
            if rng.random() < cfg.query_other_lane_prob:
                lane = -lane
            y = float(np.clip(lane + rng.uniform(-1, 1) * cfg.query_lane_jitter_m, -lateral, lateral))
            jitter = float(np.clip(rng.normal(0, cfg.query_yaw_jitter_deg / 2), -cfg.query_yaw_jitter_deg, cfg.query_yaw_jitter_deg))
            cams.append(Camera(s, float(rng.uniform(0, cfg.street_length_m)), y, (180.0 if backward else 0.0) + jitter))
            conditions.append(pick_condition(cfg, rng))
    return cams, conditions


def _image_name(kind: str, i: int, cam: Camera) -> str:
    """The path of image `i` of `kind` ("database" | "query") under the dataset root."""
    return f"{kind}/images/s{cam.street:03d}_{i:05d}.jpg"


# ------------------------------------------------------------------------------------ rendering


def _write_jpeg(path: Path, img: np.ndarray, quality: int) -> None:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def render_street(args: tuple) -> int:
    """Paint one street and render + write all its database and query images (worker task)."""
    root, cfg, street, db_jobs, q_jobs = args
    cv2.setNumThreads(1)
    root = Path(root)
    renderer = SceneRenderer(build_street(street, cfg, make_archetypes(cfg)), cfg)
    for i, cam, rel in db_jobs:
        rng = np.random.default_rng([cfg.seed, 401, i])
        img, layers = renderer.render(cam, rng)
        _write_jpeg(root / rel, database_appearance(img, layers, rng, cfg), cfg.jpeg_quality)
    for i, cam, rel, condition in q_jobs:
        rng = np.random.default_rng([cfg.seed, 402, i])
        img, layers = renderer.render(cam, rng, want_lit=condition in ("night", "dusk"))
        out = query_appearance(img, layers, condition, rng, cfg)
        _write_jpeg(root / rel, out, rng.integers(cfg.query_jpeg_quality[0], cfg.query_jpeg_quality[1] + 1))
    return street


def _pool_context():
    """fork while it is safe, spawn once torch is loaded.

    fork needs no `if __name__ == "__main__"` guard in the caller's script, but a child forked from a
    process whose OpenMP thread pool has run (torch training, then `evaluate.py split=all` on a new city)
    can hang forever; spawned children start clean. Every entry point of this project is guarded.
    """
    if "fork" in mp.get_all_start_methods() and "torch" not in sys.modules:
        return mp.get_context("fork")
    return mp.get_context("spawn")


def generate_city(out: str | Path, cfg: SynthConfig, workers: int = 2) -> Path:
    """Write a complete dataset root for `cfg` into `out` (created; existing files overwritten)."""
    root = Path(out)
    (root / "database" / "images").mkdir(parents=True, exist_ok=True)
    (root / "query" / "images").mkdir(parents=True, exist_ok=True)
    db_cams = plan_database(cfg)
    q_cams, conditions = plan_queries(cfg)
    db_paths = [_image_name("database", i, c) for i, c in enumerate(db_cams)]
    q_paths = [_image_name("query", i, c) for i, c in enumerate(q_cams)]
    tasks = []
    for s in cfg.streets:
        db_jobs = [(i, c, db_paths[i]) for i, c in enumerate(db_cams) if c.street == s]
        q_jobs = [(i, c, q_paths[i], conditions[i]) for i, c in enumerate(q_cams) if c.street == s]
        tasks.append((str(root), cfg, s, db_jobs, q_jobs))
    workers = max(1, min(int(workers), len(tasks)))
    with progress(f"rendering city streets ({len(db_cams) + len(q_cams)} images)", total=len(tasks)) as advance:
        if workers == 1:
            for t in tasks:
                render_street(t)
                advance(1)
        else:
            done: set[int] = set()
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
                    for street in pool.map(render_street, tasks):
                        done.add(street)
                        advance(1)
            except BrokenProcessPool:  # e.g. spawn from an unguarded script: render here instead
                warnings.warn("synthetic city: worker processes failed to start; rendering in this process", RuntimeWarning, stacklevel=2)
                for t in tasks:
                    if t[2] not in done:
                        render_street(t)
                        advance(1)
    qi, di, fov = fov_pairs(q_cams, db_cams, cfg)
    truth = SparseRelevance.from_pairs(len(q_cams), len(db_cams), qi, di, sim=fov >= cfg.sim_threshold, fov=fov)
    atomic_write_json(root / CONFIG_FILE, {**asdict(cfg), "conditions": conditions, "query_cameras": camera_array(q_cams).round(4).tolist(), "database_cameras": camera_array(db_cams).round(4).tolist()})
    # dense: the contract's arrays, as the study's London files; a large city: the sparse gt.h5 layout (data/dataset.py)
    dense = fits_dense(truth.n_query, truth.n_db)
    sim, fov_dense = truth.to_dense() if dense else (None, None)
    write_dataset(root, db_paths, world_loc(db_cams, cfg), q_paths, world_loc(q_cams, cfg), sim, fov_dense,
                  sparse=None if dense else truth)
    return root


# ------------------------------------------------------------------------------------ caching


def city_dir(cache_dir: str | Path, cfg: SynthConfig) -> Path:
    fields = asdict(cfg)
    if not fields["first_street"]:  # a field added later: cities from before it keep their cache folder
        del fields["first_street"]
    return Path(cache_dir) / f"synth-{stable_hash(fields)}"


def ensure_city(cache_dir: str | Path, cfg: SynthConfig, workers: int | None = None) -> Path:
    """The city for `cfg` under cache_dir, generated only if missing (on `workers` processes; None: one per
    core, at most 16).

    Generation goes to a private temporary sibling with a random name (io_utils.make_temp_dir: never an existing
    name or a planted link) that is renamed into place when complete, so an interrupted run never leaves
    something that looks like a city; stale temporaries are removed. A symbolic link (or a file) under the
    city's name is removed, never followed, and the city generated again (io_utils.check_cache_entry).
    """
    final = city_dir(cache_dir, cfg)
    check_cache_entry(final, "synthetic city", "dir")
    if _complete(final):
        return final
    tmp = make_temp_dir(final)
    try:
        generate_city(tmp, cfg, workers=workers or min(16, len(os.sched_getaffinity(0))))
        publish_dir(tmp, final, "synthetic city", _complete)  # a concurrent winner's complete city is kept
    finally:
        safe_remove(tmp, ignore_errors=True)
    return final


def _complete(root: Path) -> bool:
    """A finished city: its ground truth and config are there as regular files (links are not followed)."""
    return all(os.path.isfile(f) and not os.path.islink(f) for f in (root / "gt.h5", root / CONFIG_FILE))
