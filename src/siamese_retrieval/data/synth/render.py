"""Render one camera view of a street: sky, ground and far backdrop, both facade planes through
homographies of the cropped strips, then street props (lamps, trees). A view costs a few ms.

Besides the BGR image, `render_view` returns per-pixel layers the appearance model uses:
`label` (0 sky, 1 ground, 2 left wall, 3 right wall, 4 backdrop, 5 prop), `depth` (camera
depth in metres, large for sky) and optionally `lit` (0..1 per lit window, 0 elsewhere: a window glows when its value exceeds the hour's threshold).
"""

from __future__ import annotations

import cv2
import numpy as np

from siamese_retrieval.data.synth.config import SynthConfig
from siamese_retrieval.data.synth.facades import StreetScene
from siamese_retrieval.data.synth.geometry import Camera, column_depth, intrinsics, plane_homography, project, wall_x_range

SKY, GROUND, LEFT, RIGHT, BACKDROP, PROP = range(6)
SKY_DEPTH = 1e4


def sky_gradient(h: int, w: int, top, bottom, rng: np.random.Generator | None = None, clouds: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    sky = np.float32(top)[None, None, :] * (1 - t) + np.float32(bottom)[None, None, :] * t
    sky = np.broadcast_to(sky, (h, w, 3)).copy()
    if rng is not None and clouds > 0 and h > 1:
        low = rng.normal(0, 1, (3, 5)).astype(np.float32)
        cloud = np.clip(cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC), 0, None) * clouds
        sky = sky * (1 - np.clip(cloud, 0, 1)[:, :, None]) + 245 * np.clip(cloud, 0, 1)[:, :, None]
    return sky


class SceneRenderer:
    """Holds one street's strips packed for warping; renders any camera on that street."""

    def __init__(self, scene: StreetScene, cfg: SynthConfig):
        self.scene, self.cfg = scene, cfg
        self.left = np.ascontiguousarray(np.dstack([scene.left[0], scene.left[1]]))
        self.right = np.ascontiguousarray(np.dstack([scene.right[0], scene.right[1]]))
        self.left_lit, self.right_lit = scene.left[2], scene.right[2]
        self.ground = np.ascontiguousarray(np.dstack([scene.ground, np.full(scene.ground.shape[:2], 255, np.uint8)]))
        self.k = intrinsics(cfg)
        self.wall_h_m = self.left.shape[0] / cfg.pixels_per_m

    # ---------------------------------------------------------------------------------------
    def render(self, cam: Camera, rng: np.random.Generator, want_lit: bool = False) -> tuple[np.ndarray, dict]:
        cfg, sc = self.cfg, self.scene
        h, w = cfg.image_height, cfg.image_width
        f, cy = self.k[0, 0], self.k[1, 2]
        horizon = int(np.floor(cy))
        canvas = np.empty((h, w, 3), np.float32)
        label = np.zeros((h, w), np.uint8)
        depth = np.full((h, w), SKY_DEPTH, np.float32)
        # ---- sky and hazy ground fill
        canvas[:horizon] = sky_gradient(horizon, w, (225, 185, 140), (240, 225, 210), rng, clouds=rng.uniform(0, 0.6))
        canvas[horizon:] = (120, 122, 125)
        rows = np.arange(horizon, h, dtype=np.float32) + 0.5 - cy
        depth[horizon:] = (cfg.camera_height_m * f / np.maximum(rows, 1e-3))[:, None]
        label[horizon:] = GROUND
        # ---- ground plane (only rows below the horizon: rays there hit the ground in front)
        g = cfg.ground_pixels_per_m
        a = np.array([[1 / g, 0, sc.x_start], [0, -1 / g, sc.width / 2], [0, 0, 0.0]])
        hg = plane_homography(cam, cfg, a)
        shift = np.array([[1, 0, 0], [0, 1, -horizon], [0, 0, 1.0]])
        gw = cv2.warpPerspective(self.ground, shift @ hg, (w, h - horizon), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        ga = gw[:, :, 3:4].astype(np.float32) / 255
        canvas[horizon:] = canvas[horizon:] * (1 - ga) + gw[:, :, :3] * ga
        # ---- far backdrop closing the street at render depth
        self._backdrop(cam, canvas, label, depth)
        # ---- the two facades
        lit = np.zeros((h, w), np.float32) if want_lit else None
        for wall, strip, lit_strip, wy, lab in ((0, self.left, self.left_lit, sc.width / 2, LEFT), (1, self.right, self.right_lit, -sc.width / 2, RIGHT)):
            self._wall(cam, wall, strip, lit_strip, wy, lab, canvas, label, depth, lit)
        # ---- props, far to near
        self._props(cam, canvas, label, depth)
        layers = {"label": label, "depth": depth, "half_width": sc.width / 2}
        if want_lit:
            layers["lit"] = lit
        return np.clip(canvas, 0, 255).astype(np.uint8), layers

    # ---------------------------------------------------------------------------------------
    def _strip_map(self, wall: int, u0: int) -> np.ndarray:
        """Plane pixel (u', v, 1) of a strip crop starting at column u0 -> world point."""
        sc, ppm = self.scene, self.cfg.pixels_per_m
        if wall == 0:
            return np.array([[1 / ppm, 0, sc.x_start + u0 / ppm], [0, 0, sc.width / 2], [0, -1 / ppm, self.wall_h_m]])
        x_end = sc.x_start + self.right.shape[1] / ppm
        return np.array([[-1 / ppm, 0, x_end - u0 / ppm], [0, 0, -sc.width / 2], [0, -1 / ppm, self.wall_h_m]])

    def _wall(self, cam, wall, strip, lit_strip, wy, lab, canvas, label, depth, lit) -> None:
        cfg, sc, ppm = self.cfg, self.scene, self.cfg.pixels_per_m
        rng_x = wall_x_range(cam, wy, cfg.near_m, cfg.render_depth_m)
        if rng_x is None:
            return
        n = strip.shape[1]
        if wall == 0:
            ua, ub = (rng_x[0] - sc.x_start) * ppm, (rng_x[1] - sc.x_start) * ppm
        else:
            x_end = sc.x_start + n / ppm
            ua, ub = (x_end - rng_x[1]) * ppm, (x_end - rng_x[0]) * ppm
        u0, u1 = int(np.clip(np.floor(ua), 0, n)), int(np.clip(np.ceil(ub), 0, n))
        if u1 - u0 < 2:
            return
        hom = plane_homography(cam, cfg, self._strip_map(wall, u0))
        size = (cfg.image_width, cfg.image_height)
        warped = cv2.warpPerspective(strip[:, u0:u1], hom, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        alpha = warped[:, :, 3].astype(np.float32) / 255
        canvas *= (1 - alpha)[:, :, None]
        canvas += warped[:, :, :3] * alpha[:, :, None]
        on = alpha > 0.5
        label[on] = lab
        col = np.broadcast_to(column_depth(cam, wy, cfg)[None, :], on.shape)
        depth[on] = col[on]
        if lit is not None:
            lw = cv2.warpPerspective(lit_strip[:, u0:u1], hom, size, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            lit[on] = lw[on].astype(np.float32) / 255

    def _backdrop(self, cam, canvas, label, depth) -> None:
        cfg = self.cfg
        height, colour = self.scene.backdrop
        far = cfg.render_depth_m
        pts = []
        for wy, zs in ((self.scene.width / 2, (0.0, height)), (-self.scene.width / 2, (height, 0.0))):
            rng_x = wall_x_range(cam, wy, far, far)
            if rng_x is None:
                return
            for z in zs:
                pts.append([rng_x[0], wy, z])
        uv, zc = project(np.array(pts), cam, cfg)
        if (zc <= 0).any():
            return
        poly = np.round(uv).astype(np.int32)
        cv2.fillPoly(canvas, [poly], colour)
        cv2.fillPoly(label, [poly], BACKDROP)
        cv2.fillPoly(depth, [poly], far)

    def _props(self, cam, canvas, label, depth) -> None:
        cfg = self.cfg
        f = self.k[0, 0]
        items = []
        for kind, x, y, hgt, colour in self.scene.props:
            base, z = project(np.array([[x, y, 0.0], [x, y, hgt]]), cam, cfg)
            if z[0] < 1.0 or z[0] > cfg.render_depth_m:
                continue
            if base[:, 0].max() < -40 or base[:, 0].min() > cfg.image_width + 40:
                continue
            items.append((z[0], kind, base, hgt, colour))
        for z, kind, base, hgt, colour in sorted(items, key=lambda t: -t[0]):
            (u0, v0), (u1, v1) = base
            targets = ((canvas, None), (label, PROP), (depth, float(z)))
            if kind == "lamp":
                t = max(1, int(round(f * 0.14 / z)))
                for img, val in targets:
                    c = colour if val is None else val
                    cv2.line(img, (int(u0), int(v0)), (int(u1), int(v1)), c, t, cv2.LINE_AA if val is None else cv2.LINE_8)
                    cv2.circle(img, (int(u1), int(v1)), max(1, int(f * 0.25 / z)), (200, 220, 230) if val is None else val, -1)
            else:
                t = max(1, int(round(f * 0.3 / z)))
                trunk_top = v0 + (v1 - v0) * 0.45
                r = max(2, int(f * 1.6 / z))
                for img, val in targets:
                    c = (40, 60, 90) if val is None else val
                    cv2.line(img, (int(u0), int(v0)), (int(u0), int(trunk_top)), c, t)
                    for k, (du, dv, rr, shade) in enumerate(((0, -0.1, 1.0, 1.0), (-0.5, 0.25, 0.7, 0.8), (0.5, 0.2, 0.75, 1.15))):
                        cc = tuple(float(ch) * shade for ch in colour) if val is None else val
                        cv2.circle(img, (int(u1 + du * r), int(v1 + 0.6 * r + dv * r)), max(1, int(rr * r)), cc, -1)
