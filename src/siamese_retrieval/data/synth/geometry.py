"""Camera geometry of the synthetic city (pure numpy): poses, projections, visible facade, fov.

A camera is (street, x, y, yaw_deg) in its street's frame: x along the street, y to the left
(+y is the left wall's side), yaw counter-clockwise from +x (0: driving along +x, 180: back).
Cameras are level pinholes at `camera_height_m`.

`fov(a, b)` is the overlap of the facade stretches two cameras see: each wall is sampled every
`fov_grid_m`; a sample is visible when it lies inside the horizontal frustum at a camera depth in
[near_m, max_depth_m] (the walls are vertical and the camera lies between them, so the vertical
extent never decides and nothing occludes). fov = sum over walls |A & B| / sum over walls |A | B|,
an IoU: 1 for identical cameras, 0 across streets, symmetric.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from siamese_retrieval.data.synth.config import SynthConfig


class Camera(NamedTuple):
    street: int
    x: float
    y: float
    yaw_deg: float


def camera_array(cams: Sequence[Camera] | np.ndarray) -> np.ndarray:
    """(n, 4) float64 [street, x, y, yaw_deg] from a list of Cameras or an (n, 4) array."""
    if isinstance(cams, np.ndarray):
        return cams.astype(np.float64).reshape(-1, 4)
    return np.asarray([tuple(c) for c in cams], dtype=np.float64).reshape(-1, 4)


def as_arrays(cams: Sequence[Camera] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(street int64, x, y, yaw_rad) arrays from a list of Cameras or an (n, 4) array."""
    arr = camera_array(cams)
    return arr[:, 0].astype(np.int64), arr[:, 1], arr[:, 2], np.deg2rad(arr[:, 3])


def street_width(cfg: SynthConfig, street) -> np.ndarray:
    """Wall-to-wall width of each street in `street` (deterministic in cfg.seed)."""
    streets = np.asarray(street, dtype=np.int64)
    uniq, inv = np.unique(streets.ravel(), return_inverse=True)
    widths = np.array([cfg.street_width_m + cfg.street_width_jitter_m * np.random.default_rng([cfg.seed, 150, int(s)]).uniform(-1, 1) for s in uniq])
    return widths[inv].reshape(streets.shape) if len(uniq) else np.zeros(streets.shape)


def wall_grid(cfg: SynthConfig) -> np.ndarray:
    """Sample positions along a wall covering everything any camera of the street can see."""
    margin = cfg.max_depth_m + cfg.street_width_m + cfg.street_width_jitter_m
    return np.arange(-margin, cfg.street_length_m + margin + 1e-9, cfg.fov_grid_m)


def visibility_masks(cams, cfg: SynthConfig) -> np.ndarray:
    """(n, 2 * n_grid) float32: which wall samples (left wall, then right wall) each camera sees."""
    street, x, y, yaw = as_arrays(cams)
    half = street_width(cfg, street)[:, None] / 2
    xs = wall_grid(cfg)
    cos, sin = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    tan_half = np.tan(np.deg2rad(cfg.hfov_deg) / 2)
    masks = []
    for wy in (half, -half):  # left wall, right wall
        dx = xs[None, :] - x[:, None]
        dy = wy - y[:, None]
        z = dx * cos + dy * sin  # depth along the optical axis
        lat = dx * sin - dy * cos  # to the right
        masks.append((z >= cfg.near_m) & (z <= cfg.max_depth_m) & (np.abs(lat) <= z * tan_half))
    return np.concatenate(masks, axis=1).astype(np.float32)


def fov_pairs(cams_a, cams_b, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The overlapping camera pairs, sparse: (index into a, index into b, float32 facade-overlap IoU in (0, 1]),
    sorted by a then b. Only cameras on the same street can overlap, so the work is one small block per street
    (a 100k-image city never builds its dense (n_a, n_b) matrix)."""
    arr_a, arr_b = camera_array(cams_a), camera_array(cams_b)
    sa, sb = arr_a[:, 0].astype(np.int64), arr_b[:, 0].astype(np.int64)
    parts = []
    for s in np.intersect1d(sa, sb):
        ia, ib = np.flatnonzero(sa == s), np.flatnonzero(sb == s)
        ma, mb = visibility_masks(arr_a[ia], cfg), visibility_masks(arr_b[ib], cfg)
        inter = ma @ mb.T
        union = ma.sum(1)[:, None] + mb.sum(1)[None, :] - inter
        block = np.clip(np.where(union > 0, inter / np.maximum(union, 1), 0.0), 0.0, 1.0).astype(np.float32)
        r, c = np.nonzero(block > 0)
        parts.append((ia[r], ib[c], block[r, c]))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b, f = (np.concatenate([p[i] for p in parts]) for i in range(3))
    order = np.lexsort((b, a))
    return a[order].astype(np.int64), b[order].astype(np.int64), f[order]


def fov_matrix(cams_a, cams_b, cfg: SynthConfig) -> np.ndarray:
    """(len(a), len(b)) float32 facade-overlap IoU in [0, 1]; 0 between different streets (small sets only)."""
    out = np.zeros((len(cams_a), len(cams_b)), np.float32)
    a, b, f = fov_pairs(cams_a, cams_b, cfg)
    out[a, b] = f
    return out


# ------------------------------------------------------------------------------ world placement


def world_loc(cams, cfg: SynthConfig) -> np.ndarray:
    """(n, 3) [east, north, heading] with heading a compass bearing in degrees (0 north, 90 east)."""
    s, x, y, yaw = as_arrays(cams)
    e0 = cfg.street_spacing_m / 2 - cfg.street_length_m / 2  # world (east, north) of a street's x = 0, y = 0
    n0 = s.astype(np.float64) * cfg.street_spacing_m + cfg.street_spacing_m / 2  # (streets run east)
    heading = np.mod(90.0 - np.rad2deg(yaw), 360.0)
    return np.stack([e0 + x, n0 + y, heading], axis=1)


# ------------------------------------------------------------------------------ projection


def intrinsics(cfg: SynthConfig) -> np.ndarray:
    f = (cfg.image_width / 2) / np.tan(np.deg2rad(cfg.hfov_deg) / 2)
    return np.array([[f, 0, cfg.image_width / 2], [0, f, cfg.image_height / 2], [0, 0, 1.0]])


def rotation(yaw_rad: float) -> np.ndarray:
    """World (street frame) -> camera (x right, y down, z forward) for a level camera."""
    c, s = np.cos(yaw_rad), np.sin(yaw_rad)
    return np.array([[s, -c, 0.0], [0.0, 0.0, -1.0], [c, s, 0.0]])


def camera_center(cam: Camera, cfg: SynthConfig) -> np.ndarray:
    return np.array([cam.x, cam.y, cfg.camera_height_m])


def plane_homography(cam: Camera, cfg: SynthConfig, plane_to_world: np.ndarray) -> np.ndarray:
    """Homography from plane pixel (u, v, 1) to image pixel, given plane pixel -> world point (3x3)."""
    a = plane_to_world.astype(np.float64).copy()
    a[:, 2] -= camera_center(cam, cfg)
    return intrinsics(cfg) @ rotation(np.deg2rad(cam.yaw_deg)) @ a


def project(points: np.ndarray, cam: Camera, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """World points (n, 3) -> image pixels (n, 2) and camera depth (n,)."""
    pc = (rotation(np.deg2rad(cam.yaw_deg)) @ (np.asarray(points, float) - camera_center(cam, cfg)).T).T
    z = pc[:, 2]
    uv = (intrinsics(cfg) @ pc.T).T
    return uv[:, :2] / np.where(np.abs(z) < 1e-9, 1e-9, z)[:, None], z


def wall_x_range(cam: Camera, wall_y_m: float, z_min: float, z_max: float) -> tuple[float, float] | None:
    """The x interval of the wall at y = wall_y_m whose camera depth lies in [z_min, z_max]."""
    yaw = np.deg2rad(cam.yaw_deg)
    c, s = np.cos(yaw), np.sin(yaw)
    z0 = (wall_y_m - cam.y) * s  # depth of the wall point at x = cam.x
    if abs(c) < 1e-6:
        return (-np.inf, np.inf) if z_min <= z0 <= z_max else None
    x1, x2 = cam.x + (z_min - z0) / c, cam.x + (z_max - z0) / c
    return (min(x1, x2), max(x1, x2))


def column_depth(cam: Camera, wall_y_m: float, cfg: SynthConfig) -> np.ndarray:
    """Camera depth of the wall at y = wall_y_m seen in each image column (inf where not hit)."""
    k = intrinsics(cfg)
    a = (np.arange(cfg.image_width) + 0.5 - k[0, 2]) / k[0, 0]  # lateral (right) per unit depth
    yaw = np.deg2rad(cam.yaw_deg)
    # ray direction in the street frame for depth 1: forward + a * right
    dy = np.sin(yaw) + a * (-np.cos(yaw))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (wall_y_m - cam.y) / dy
    return np.where(t > 0, t, np.inf)
