"""Appearance changes applied after rendering: the "times" at which a place is seen.

Queries get one condition (sunny, overcast, dusk, night, fog, rain) at full strength plus
occluders (cars, pedestrians), blur, sensor noise, gamma and colour cast; database images get a
mild day-to-day variation. Everything is drawn from the caller's rng, so it is deterministic.
"""

from __future__ import annotations

import cv2
import numpy as np

from siamese_retrieval.data.synth.config import SynthConfig
from siamese_retrieval.data.synth.geometry import intrinsics
from siamese_retrieval.data.synth.render import GROUND, LEFT, RIGHT, SKY, sky_gradient


def pick_condition(cfg: SynthConfig, rng: np.random.Generator) -> str:
    names = [c[0] for c in cfg.query_conditions]
    p = np.array([c[1] for c in cfg.query_conditions], dtype=np.float64)
    return names[rng.choice(len(names), p=p / p.sum())]


def _wall_height(layers: dict, cfg: SynthConfig) -> np.ndarray:
    """Height above ground of each pixel's wall point (level camera: from row and depth)."""
    k = intrinsics(cfg)
    rows = (np.arange(cfg.image_height, dtype=np.float32) + 0.5 - k[1, 2])[:, None]
    return cfg.camera_height_m - rows * layers["depth"] / k[1, 1]


def _replace_sky(img: np.ndarray, layers: dict, top, bottom, rng, clouds: float = 0.0) -> None:
    sky = layers["label"] == SKY
    rows = np.flatnonzero(sky.any(1))
    if len(rows) == 0:
        return
    h = rows.max() + 1
    grad = sky_gradient(h, img.shape[1], top, bottom, rng, clouds)
    img[:h][sky[:h]] = grad[sky[:h]]


def _sunny(img, layers, s, rng, cfg) -> None:
    label = layers["label"]
    sun_wall = LEFT if rng.random() < 0.5 else RIGHT
    shade_wall = RIGHT if sun_wall == LEFT else LEFT
    shadow_h = rng.uniform(2.0, 14.0)  # the opposite buildings' shadow line on the sunlit wall
    height = _wall_height(layers, cfg)
    sunlit = (label == sun_wall) & (height > shadow_h)
    warm = np.float32([0.88, 1.0, 1.1])
    img[sunlit] *= (1 + 0.3 * s) * warm
    shade = (label == shade_wall) | ((label == sun_wall) & ~sunlit)
    img[shade] *= (1 - 0.3 * s) * np.float32([1.1, 1.0, 0.92])
    img[label == GROUND] *= 1 + rng.uniform(-0.2, 0.25) * s
    _replace_sky(img, layers, (230, 160, 90), (245, 215, 185), rng, rng.uniform(0, 0.4))


def _overcast(img, layers, s, rng, cfg) -> None:
    grey = img.mean(2, keepdims=True)
    img[:] = img * (1 - 0.55 * s) + grey * 0.55 * s
    m = img.mean()
    img[:] = m + (img - m) * (1 - 0.4 * s)
    _replace_sky(img, layers, (205, 205, 200), (225, 225, 222), rng, rng.uniform(0.2, 0.8))


def _dusk(img, layers, s, rng, cfg) -> None:
    img *= np.float32([0.65, 0.8, 1.05]) * (1 - 0.35 * s)
    _replace_sky(img, layers, (120, 70, 90), (120, 150, 245), rng, rng.uniform(0, 0.3))
    if "lit" in layers:
        glow = (layers["lit"] > rng.uniform(0.6, 0.9)) * 0.6 * s
        img[:] = img * (1 - glow[:, :, None]) + np.float32([120, 210, 250]) * glow[:, :, None]


def _night(img, layers, s, rng, cfg) -> None:
    label = layers["label"]
    img *= rng.uniform(0.12, 0.25) ** s * np.float32([1.25, 0.95, 0.8])
    _replace_sky(img, layers, (25, 12, 8), (45, 30, 22), None)
    if "lit" in layers:
        glow = (layers["lit"] > rng.uniform(0.2, 0.6)).astype(np.float32) * 0.85
        colour = np.float32([90, 190, 245]) * rng.uniform(0.7, 1.0)
        img[:] = img * (1 - glow[:, :, None]) + colour * glow[:, :, None]
    # headlight / street-light pool on the road
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pool = np.exp(-(((xx - w / 2) / (0.35 * w)) ** 2 + ((yy - h) / (0.3 * h)) ** 2))
    img += (pool * 70 * s)[:, :, None] * np.float32([0.8, 0.95, 1.0])


def _fog(img, layers, s, rng, cfg) -> None:
    dist = rng.uniform(18, 60) / max(s, 1e-3)
    t = 1 - np.exp(-np.minimum(layers["depth"], 1e3) / dist)
    colour = np.float32([200, 200, 195]) * rng.uniform(0.85, 1.05)
    img[:] = img * (1 - t[:, :, None]) + colour * t[:, :, None]


def _rain(img, layers, s, rng, cfg) -> None:
    _overcast(img, layers, 0.8 * s, rng, cfg)
    img *= 1 - 0.3 * s
    h, w = img.shape[:2]
    streaks = np.zeros((h, w), np.float32)
    for _ in range(int(60 * s)):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        ln = rng.uniform(4, 12)
        cv2.line(streaks, (int(x), int(y)), (int(x + 0.25 * ln), int(y + ln)), 1.0, 1)
    img += streaks[:, :, None] * 55 * s
    ground = layers["label"] == GROUND
    img[ground] *= 0.85  # wet, dark road


CONDITIONS = {"sunny": _sunny, "overcast": _overcast, "dusk": _dusk, "night": _night, "fog": _fog, "rain": _rain}


# ------------------------------------------------------------------------------------ occluders


def draw_occluders(img: np.ndarray, n: int, rng: np.random.Generator, cfg: SynthConfig, half_width: float | None = None) -> None:
    """Cars on the road and pedestrians on the sidewalks, drawn by depth (far first)."""
    k = intrinsics(cfg)
    f, cx, cy = k[0, 0], k[0, 2], k[1, 2]
    half = cfg.street_width_m / 2 if half_width is None else half_width
    road = half - cfg.sidewalk_m
    items = []
    for _ in range(n):
        kind = "car" if rng.random() < 0.6 else "ped"
        z = rng.uniform(5.0, 20.0)
        lateral = rng.uniform(-road + 1, road - 1) if kind == "car" else rng.choice([-1, 1]) * rng.uniform(road + 0.3, half - 0.3)
        items.append((z, kind, lateral))
    for z, kind, lateral in sorted(items, reverse=True):
        ground_v = cy + f * cfg.camera_height_m / z
        u = cx + f * lateral / z
        if kind == "car":
            wpx, hpx = f * 1.8 / z, f * 1.45 / z
            body = tuple(float(c) for c in cv2.cvtColor(np.uint8([[[rng.integers(180), rng.integers(0, 220), rng.integers(40, 230)]]]), cv2.COLOR_HSV2BGR)[0, 0])
            x0, x1 = int(u - wpx / 2), int(u + wpx / 2)
            y1, y0 = int(ground_v - 0.15 * hpx), int(ground_v - hpx)
            cv2.rectangle(img, (x0, int(y0 + 0.4 * hpx)), (x1, y1), body, -1)
            roof = np.array([[x0 + 0.12 * wpx, y0 + 0.4 * hpx], [x0 + 0.22 * wpx, y0], [x1 - 0.22 * wpx, y0], [x1 - 0.12 * wpx, y0 + 0.4 * hpx]], np.int32)
            cv2.fillPoly(img, [roof], body)
            win = np.array([[x0 + 0.18 * wpx, y0 + 0.38 * hpx], [x0 + 0.26 * wpx, y0 + 0.06 * hpx], [x1 - 0.26 * wpx, y0 + 0.06 * hpx], [x1 - 0.18 * wpx, y0 + 0.38 * hpx]], np.int32)
            cv2.fillPoly(img, [win], (45, 40, 35))
            r = max(1, int(0.18 * hpx))
            for xw in (x0 + int(0.2 * wpx), x1 - int(0.2 * wpx)):
                cv2.circle(img, (xw, y1), r, (20, 20, 20), -1)
            for xl in (x0 + int(0.1 * wpx), x1 - int(0.1 * wpx)):
                cv2.circle(img, (xl, int(y0 + 0.6 * hpx)), max(1, r // 2), (80, 80, 230), -1)
        else:
            hpx = f * rng.uniform(1.55, 1.9) / z
            cloth = tuple(float(c) for c in rng.integers(20, 220, 3))
            x, y1 = int(u), int(ground_v)
            cv2.ellipse(img, (x, int(y1 - 0.55 * hpx)), (max(1, int(0.14 * hpx)), max(1, int(0.3 * hpx))), 0, 0, 360, cloth, -1)
            cv2.line(img, (x - int(0.05 * hpx), int(y1 - 0.3 * hpx)), (x - int(0.06 * hpx), y1), (40, 40, 50), max(1, int(0.06 * hpx)))
            cv2.line(img, (x + int(0.05 * hpx), int(y1 - 0.3 * hpx)), (x + int(0.06 * hpx), y1), (40, 40, 50), max(1, int(0.06 * hpx)))
            cv2.circle(img, (x, int(y1 - 0.9 * hpx)), max(1, int(0.07 * hpx)), (120, 150, 190), -1)


# ------------------------------------------------------------------------------------ pipelines


def _finish(img: np.ndarray, rng: np.random.Generator, s: float, noise_std: float, blur_prob: float) -> np.ndarray:
    """Global camera effects: colour cast, gamma, blur, sensor noise."""
    img *= 1 + rng.normal(0, 0.06 * s, 3).astype(np.float32)
    img *= 1 + rng.uniform(-0.15, 0.15) * s
    out = np.clip(img, 0, 255)
    gamma = np.exp(rng.normal(0, 0.2 * s))
    out = 255.0 * (out / 255.0) ** gamma
    if rng.random() < blur_prob:
        if rng.random() < 0.5:
            sigma = rng.uniform(0.6, 1.6) * max(s, 0.3)
            out = cv2.GaussianBlur(out, (0, 0), sigma)
        else:  # horizontal motion blur
            n = int(rng.integers(3, 8))
            out = cv2.filter2D(out, -1, np.full((1, n), 1.0 / n, np.float32))
    if noise_std > 0:
        out = out + rng.normal(0, noise_std, out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def query_appearance(img: np.ndarray, layers: dict, condition: str, rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    s = cfg.query_appearance
    work = img.astype(np.float32)
    if s > 0:
        CONDITIONS[condition](work, layers, s, rng, cfg)
        if rng.random() < cfg.occluder_prob:
            work_u8 = np.clip(work, 0, 255).astype(np.uint8)
            draw_occluders(work_u8, int(rng.integers(1, 4)), rng, cfg, layers.get("half_width"))
            if condition == "night":
                work_u8 = (work_u8.astype(np.float32) * 0.5).astype(np.uint8)
            work = work_u8.astype(np.float32)
    noise = cfg.noise_std * s * (2.5 if condition == "night" else 1.0) * rng.uniform(0.5, 1.5)
    return _finish(work, rng, s, noise, cfg.blur_prob if s > 0 else 0.0)


def database_appearance(img: np.ndarray, layers: dict, rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    s = cfg.db_appearance
    work = img.astype(np.float32)
    if s > 0:
        (_sunny if rng.random() < 0.5 else _overcast)(work, layers, s, rng, cfg)
        if rng.random() < cfg.occluder_prob * 0.4:
            work_u8 = np.clip(work, 0, 255).astype(np.uint8)
            draw_occluders(work_u8, 1, rng, cfg, layers.get("half_width"))
            work = work_u8.astype(np.float32)
    return _finish(work, rng, s, cfg.noise_std * s, cfg.blur_prob * s * 0.5)
