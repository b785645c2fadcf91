"""Procedural facades: building archetypes, their instances, and the per-street texture strips.

A wall strip is painted once per street: (H, W, 3) BGR, an alpha mask (0 above the roofline:
sky) and a `lit` mask (windows that glow at night). Strip column u covers wall metre u / ppm from
the strip's start; row r is height (H - r) / ppm above the ground. Archetypes are drawn once per
city from the seed; every building is an instance of one (small colour / width / detail changes,
sometimes its own sign text), so different streets contain look-alike buildings.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from siamese_retrieval.data.synth.config import SynthConfig
from siamese_retrieval.data.synth.geometry import street_width

WORDS = [
    "CAFE", "BAR", "HOTEL", "BAKERY", "PHARMACY", "BANK", "BOOKS", "PIZZA", "SUSHI", "MARKET",
    "FLOWERS", "DELI", "SALON", "OPTICIAN", "TAILOR", "SHOES", "PUB", "KEBAB", "LAUNDRY", "GALLERY",
    "BISTRO", "NEWS", "TOYS", "MUSIC", "DENTIST", "BUTCHER", "WINE", "TEA ROOM", "GYM", "POST",
    "CINEMA", "HOSTEL", "JEWELLER", "FASHION", "MOBILE", "PHOTO", "HARDWARE", "GROCER", "NOODLES",
]
FONTS = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_COMPLEX]
MATERIALS = ["plaster", "brick", "stone", "panel", "plaster", "brick"]
WINDOW_STYLES = ["plain", "framed", "arched", "shutters", "ribbon", "framed"]
GROUNDS = ["shop", "shop", "doors", "arcade"]
ROOFS = ["flat", "parapet", "gable", "mansard", "flat"]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    px = np.uint8([[[int(h) % 180, int(np.clip(s, 0, 255)), int(np.clip(v, 0, 255))]]])
    return cv2.cvtColor(px, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _wall_colour(rng: np.random.Generator) -> np.ndarray:
    family = rng.integers(5)
    if family == 0:  # cream / sand
        return _hsv(rng.uniform(12, 28), rng.uniform(30, 90), rng.uniform(170, 235))
    if family == 1:  # red brick / terracotta
        return _hsv(rng.uniform(2, 14), rng.uniform(110, 190), rng.uniform(100, 175))
    if family == 2:  # greys
        return _hsv(rng.uniform(0, 180), rng.uniform(0, 25), rng.uniform(100, 210))
    if family == 3:  # pastels
        return _hsv(rng.uniform(0, 180), rng.uniform(40, 100), rng.uniform(170, 240))
    return _hsv(rng.uniform(0, 180), rng.uniform(20, 80), rng.uniform(55, 115))  # dark


def _unique_word(rng: np.random.Generator) -> str:
    cons, vows = "BCDFGHKLMNPRSTVZ", "AEIOU"
    n = rng.integers(2, 4)
    word = "".join(cons[rng.integers(len(cons))] + vows[rng.integers(len(vows))] for _ in range(n))
    return word + ("'S" if rng.random() < 0.4 else "")


@dataclass
class Archetype:
    index: int
    width_m: float
    ground_h: float
    floor_h: float
    n_floors: int
    material: str
    wall: np.ndarray
    trim: np.ndarray
    bay_m: float
    win_w: float
    win_h: float
    win_style: str
    panes: int
    glass: np.ndarray
    frame: np.ndarray
    shutter: np.ndarray
    string_course: bool
    cornice_h: float
    roof: str
    roof_colour: np.ndarray
    roof_h: float
    balcony_floors: tuple[int, ...]
    ground: str
    sign_bg: np.ndarray
    sign_fg: np.ndarray
    word: str
    font: int
    awning: bool
    awning_colour: np.ndarray
    door: np.ndarray
    rustication: bool


def make_archetypes(cfg: SynthConfig) -> list[Archetype]:
    """The city's building archetypes (deterministic in cfg.seed)."""
    rng = np.random.default_rng([cfg.seed, 101])
    out = []
    for i in range(cfg.n_archetypes):
        ground_h = rng.uniform(3.6, 4.8)
        floor_h = rng.uniform(2.9, 3.7)
        cornice_h = rng.uniform(0.3, 1.0)
        roof = ROOFS[rng.integers(len(ROOFS))]
        roof_h = rng.uniform(1.5, 3.5) if roof in ("gable", "mansard") else (0.8 if roof == "parapet" else 0.0)
        room = cfg.wall_height_m - 1.0 - ground_h - cornice_h - roof_h
        n_floors = int(np.clip(rng.integers(1, 7), 1, max(1, room // floor_h)))
        wall = _wall_colour(rng)
        trim = np.clip(wall * rng.uniform(0.6, 1.4) + rng.normal(0, 20, 3), 20, 250).astype(np.float32)
        if rng.random() < 0.4:
            trim = _hsv(0, 0, rng.uniform(200, 245))
        win_w = rng.uniform(0.9, 1.7)
        out.append(
            Archetype(
                index=i,
                width_m=rng.uniform(*cfg.building_width_m),
                ground_h=ground_h,
                floor_h=floor_h,
                n_floors=n_floors,
                material=MATERIALS[rng.integers(len(MATERIALS))],
                wall=wall,
                trim=trim,
                bay_m=win_w + rng.uniform(0.9, 2.4),
                win_w=win_w,
                win_h=min(rng.uniform(1.3, 2.2), floor_h - 0.8),
                win_style=WINDOW_STYLES[rng.integers(len(WINDOW_STYLES))],
                panes=int(rng.integers(1, 5)),
                glass=_hsv(rng.uniform(90, 125), rng.uniform(20, 90), rng.uniform(40, 110)),
                frame=_hsv(0, 0, rng.uniform(20, 250)) if rng.random() < 0.7 else _hsv(rng.uniform(0, 180), 120, 120),
                shutter=_hsv(rng.uniform(0, 180), rng.uniform(60, 160), rng.uniform(60, 170)),
                string_course=bool(rng.random() < 0.5),
                cornice_h=cornice_h,
                roof=roof,
                roof_colour=_hsv(rng.uniform(0, 20), rng.uniform(30, 150), rng.uniform(50, 120)),
                roof_h=roof_h,
                balcony_floors=tuple(int(f) for f in range(1, n_floors + 1) if rng.random() < 0.3),
                ground=GROUNDS[rng.integers(len(GROUNDS))],
                sign_bg=_hsv(rng.uniform(0, 180), rng.uniform(80, 255), rng.uniform(40, 230)),
                sign_fg=_hsv(0, 0, 245) if rng.random() < 0.6 else _hsv(rng.uniform(0, 180), 200, 230),
                word=WORDS[rng.integers(len(WORDS))],
                font=FONTS[rng.integers(len(FONTS))],
                awning=bool(rng.random() < 0.5),
                awning_colour=_hsv(rng.uniform(0, 180), rng.uniform(120, 230), rng.uniform(90, 210)),
                door=_hsv(rng.uniform(0, 30), rng.uniform(60, 200), rng.uniform(30, 120)),
                rustication=bool(rng.random() < 0.35),
            )
        )
    return out


@dataclass
class Instance:
    arch: Archetype
    width_m: float
    colour_gain: np.ndarray
    word: str
    lit_p: float
    curtain_p: float
    seed: int


def make_instance(arch: Archetype, rng: np.random.Generator, cfg: SynthConfig) -> Instance:
    v = cfg.instance_variation
    word = _unique_word(rng) if rng.random() < cfg.unique_sign_prob else arch.word
    return Instance(
        arch=arch,
        width_m=float(np.clip(arch.width_m * (1 + rng.uniform(-0.12, 0.12) * v), *cfg.building_width_m)),
        colour_gain=(1 + rng.normal(0, 0.05 * v, 3) + rng.normal(0, 0.05 * v)).astype(np.float32),
        word=word,
        lit_p=float(rng.uniform(0.15, 0.6)),
        curtain_p=float(rng.uniform(0.0, 0.5) * v),
        seed=int(rng.integers(2**31)),
    )


# --------------------------------------------------------------------------------- painting


def _material(arch: Archetype, h: int, w: int, ppm: float, rng: np.random.Generator) -> np.ndarray:
    """(h, w) float32 brightness modulation around 1 for the wall material."""
    vv, uu = np.mgrid[0:h, 0:w]
    table = rng.uniform(0.85, 1.15, 997).astype(np.float32)
    if arch.material == "brick":
        course = max(3, int(round(0.28 * ppm)))
        brick = max(6, int(round(0.62 * ppm)))
        row = vv // course
        off = (row % 2) * (brick // 2)
        col = (uu + off) // brick
        mod = table[(row * 131 + col * 7) % 997]
        mortar = (vv % course == 0) | ((uu + off) % brick == 0)
        mod = np.where(mortar, 1.25, mod)
    elif arch.material == "stone":
        course = max(5, int(round(0.55 * ppm)))
        block = max(10, int(round(1.1 * ppm)))
        row = vv // course
        off = (row % 2) * (block // 3)
        mod = table[(row * 53 + (uu + off) // block * 11) % 997] * 0.5 + 0.5
        mod = np.where((vv % course == 0) | ((uu + off) % block == 0), 0.8, mod)
    elif arch.material == "panel":
        ph, pw = max(8, int(round(arch.floor_h * ppm / 2))), max(12, int(round(1.6 * ppm)))
        mod = 0.94 + 0.12 * table[((vv // ph) * 17 + (uu // pw) * 5) % 997].astype(np.float32) - 0.12
        mod = np.where((vv % ph == 0) | (uu % pw == 0), 0.7, mod)
    else:  # plaster
        mod = np.ones((h, w), np.float32)
    low = cv2.resize(rng.normal(0, 1, (max(2, h // 24), max(2, w // 24))).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    fine = rng.normal(0, 0.035, (h, w)).astype(np.float32)
    return (mod.astype(np.float32) * (1 + 0.06 * low) + fine).astype(np.float32)


def _fill(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, colour) -> None:
    h, w = img.shape[:2]
    x0, x1, y0, y1 = max(0, x0), min(w, x1), max(0, y0), min(h, y1)
    if x1 > x0 and y1 > y0:
        img[y0:y1, x0:x1] = colour


def _glass(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, glass: np.ndarray, rng: np.random.Generator) -> None:
    h, w = img.shape[:2]
    x0c, x1c, y0c, y1c = max(0, x0), min(w, x1), max(0, y0), min(h, y1)
    if x1c <= x0c or y1c <= y0c:
        return
    hh, ww = y1c - y0c, x1c - x0c
    grad = np.linspace(1.35, 0.75, hh, dtype=np.float32)[:, None, None]
    patch = np.broadcast_to(glass[None, None, :] * grad, (hh, ww, 3)).copy()
    # a diagonal sky reflection
    uu = np.arange(ww)[None, :] + np.arange(hh)[:, None] * rng.uniform(0.3, 1.0)
    c, width = rng.uniform(0, ww + hh), rng.uniform(2, 6)
    patch[np.abs(uu - c) < width] *= 1.35
    img[y0c:y1c, x0c:x1c] = np.clip(patch, 0, 255)


class StripPainter:
    """Paints buildings into one wall strip."""

    def __init__(self, width_px: int, cfg: SynthConfig):
        self.cfg = cfg
        self.ppm = cfg.pixels_per_m
        self.h = int(round(cfg.wall_height_m * self.ppm))
        self.img = np.zeros((self.h, width_px, 3), np.uint8)
        self.alpha = np.zeros((self.h, width_px), np.uint8)
        self.lit = np.zeros((self.h, width_px), np.uint8)

    def row(self, height_m: float) -> int:
        return int(round(self.h - height_m * self.ppm))

    def building(self, inst: Instance, c0: int, c1: int) -> None:
        a, ppm = inst.arch, self.ppm
        rng = np.random.default_rng(inst.seed)
        img, lit = self.img, self.lit
        top_m = a.ground_h + a.n_floors * a.floor_h
        r_top = self.row(top_m + a.cornice_h)
        w = c1 - c0
        if w <= 8:
            return
        wall = np.clip(a.wall * inst.colour_gain, 0, 255)
        trim = np.clip(a.trim * inst.colour_gain, 0, 255)
        # ---- wall body
        body_h = self.h - r_top
        mod = _material(a, body_h, w, ppm, rng)
        img[r_top:, c0:c1] = np.clip(mod[:, :, None] * wall[None, None, :], 0, 255).astype(np.uint8)
        self.alpha[r_top:, c0:c1] = 255
        if a.rustication:  # banded ground floor
            rg = self.row(a.ground_h)
            for r in range(rg, self.h, max(4, int(0.45 * ppm))):
                img[r, c0:c1] = (wall * 0.7).astype(np.uint8)
        # ---- roof / cornice
        _fill(img, c0, r_top, c1, r_top + max(2, int(a.cornice_h * ppm)), trim)
        _fill(img, c0, r_top + max(2, int(a.cornice_h * ppm)), c1, r_top + max(3, int(a.cornice_h * ppm)) + 1, trim * 0.6)
        if a.roof == "parapet":
            rp = self.row(top_m + a.cornice_h + a.roof_h)
            _fill(img, c0 + 2, rp, c1 - 2, r_top, wall * 0.9)
            self.alpha[rp:r_top, c0 + 2 : c1 - 2] = 255
        elif a.roof in ("gable", "mansard"):
            rp = self.row(top_m + a.cornice_h + a.roof_h)
            inset = int(a.roof_h * ppm * (1.0 if a.roof == "gable" else 0.5))
            if a.roof == "gable":
                inset = max(inset, (w // 2) - int(w * 0.15))
            pts = np.array([[c0, r_top], [c0 + inset, rp], [c1 - inset, rp], [c1, r_top]], np.int32)
            colour = (trim if a.roof == "gable" else a.roof_colour).tolist()
            cv2.fillPoly(img, [pts], colour)
            cv2.fillPoly(self.alpha, [pts], 255)
            if a.roof == "mansard":  # dormers
                n_d = max(1, int((w - 2 * inset) / (a.bay_m * ppm)))
                for k in range(n_d):
                    cx = c0 + inset + int((k + 0.5) * (w - 2 * inset) / n_d)
                    dw, dh = int(0.5 * a.win_w * ppm), int(0.55 * a.roof_h * ppm)
                    _fill(img, cx - dw, r_top - dh - 2, cx + dw, r_top - 2, trim)
                    _glass(img, cx - dw + 2, r_top - dh, cx + dw - 2, r_top - 3, a.glass, rng)
        # ---- storeys
        n_cols = max(1, int(round(inst.width_m / a.bay_m)))
        bay_px = w / n_cols
        ww = max(3, int(a.win_w * ppm))
        wh = max(4, int(a.win_h * ppm))
        for f in range(a.n_floors):
            floor_base = a.ground_h + f * a.floor_h
            rb = self.row(floor_base)
            if a.string_course:
                _fill(img, c0, rb - 2, c1, rb + 1, trim)
            sill_r = self.row(floor_base + 0.9)
            if a.win_style == "ribbon":
                rt = sill_r - wh
                _glass(img, c0 + 3, rt, c1 - 3, sill_r, a.glass, rng)
                for k in range(n_cols + 1):
                    x = c0 + 3 + int(k * (w - 6) / max(1, n_cols))
                    _fill(img, x - 1, rt, x + 1, sill_r, a.frame)
                if rng.random() < inst.lit_p:
                    lit[rt:sill_r, c0 + 3 : c1 - 3] = rng.integers(1, 256)
                continue
            for k in range(n_cols):
                cx = c0 + int((k + 0.5) * bay_px)
                x0, x1, y1, y0 = cx - ww // 2, cx + ww // 2, sill_r, sill_r - wh
                self._window(a, inst, rng, x0, y0, x1, y1, trim)
                if (f + 1) in a.balcony_floors:
                    bw = ww // 2 + int(0.45 * ppm)
                    _fill(img, cx - bw, y1 - 1, cx + bw, y1 + 2, trim * 0.8)
                    rail_top = y1 - int(1.0 * ppm)
                    cv2.line(img, (cx - bw, rail_top), (cx + bw, rail_top), (30, 30, 30), 1)
                    for xr in range(cx - bw, cx + bw + 1, 3):
                        cv2.line(img, (xr, rail_top), (xr, y1), (40, 40, 40), 1)
        # ---- ground floor
        self._ground_floor(a, inst, rng, c0, c1, trim)
        # ---- per-instance extras: drainpipe, posters, AC units, stains
        if rng.random() < 0.7:
            xp = c0 + 1 if rng.random() < 0.5 else c1 - 3
            _fill(img, xp, r_top, xp + 2, self.h, (60, 60, 60))
        for _ in range(rng.integers(0, 3)):
            px, pw_, ph_ = c0 + int(rng.uniform(0.05, 0.8) * w), int(0.6 * ppm), int(0.9 * ppm)
            pr = self.row(rng.uniform(1.0, 1.6))
            colour = _hsv(rng.uniform(0, 180), rng.uniform(60, 255), rng.uniform(80, 255))
            _fill(img, px, pr - ph_, px + pw_, pr, colour)
            cv2.line(img, (px + 2, pr - ph_ + 4), (px + pw_ - 2, pr - ph_ + 4), (20, 20, 20), 1)
        for _ in range(rng.integers(0, 3)):
            f = rng.integers(0, a.n_floors)
            ax = c0 + int(rng.uniform(0.05, 0.9) * w)
            ar = self.row(a.ground_h + f * a.floor_h + 0.6)
            _fill(img, ax, ar - int(0.5 * ppm), ax + int(0.8 * ppm), ar, (175, 178, 180))
        if rng.random() < 0.5:  # rain stains
            sx = c0 + int(rng.uniform(0, 0.9) * w)
            stain = img[r_top:, sx : sx + int(rng.uniform(0.5, 2.5) * ppm)].astype(np.float32)
            fade = np.linspace(0.75, 1.0, stain.shape[0], dtype=np.float32)[:, None, None]
            img[r_top:, sx : sx + stain.shape[1]] = (stain * fade).astype(np.uint8)
        # building seam
        img[r_top:, c0] = (img[r_top:, c0] * 0.6).astype(np.uint8)

    def _window(self, a: Archetype, inst: Instance, rng, x0, y0, x1, y1, trim) -> None:
        img, ppm = self.img, self.ppm
        style = a.win_style
        if style == "framed":
            _fill(img, x0 - 3, y0 - 4, x1 + 3, y1 + 1, trim)
        if style == "shutters":
            sw = (x1 - x0) // 2
            for xa, xb in ((x0 - sw - 1, x0 - 1), (x1 + 1, x1 + sw + 1)):
                if rng.random() < 0.85:
                    _fill(img, xa, y0, xb, y1, a.shutter)
                    for yy in range(y0 + 2, y1, 3):
                        cv2.line(img, (xa, yy), (xb - 1, yy), (a.shutter * 0.7).tolist(), 1)
        _glass(img, x0, y0, x1, y1, a.glass, rng)
        if style == "arched":
            cv2.ellipse(img, ((x0 + x1) // 2, y0), ((x1 - x0) // 2, max(2, (x1 - x0) // 3)), 0, 180, 360, a.glass.tolist(), -1)
            cv2.ellipse(img, ((x0 + x1) // 2, y0), ((x1 - x0) // 2 + 1, max(2, (x1 - x0) // 3) + 1), 0, 180, 360, trim.tolist(), 1)
        if rng.random() < inst.curtain_p:  # curtains / blinds: per instance
            colour = _hsv(rng.uniform(0, 180), rng.uniform(0, 60), rng.uniform(150, 235))
            _fill(img, x0, y0, x1, y0 + int((y1 - y0) * rng.uniform(0.2, 0.9)), colour)
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), a.frame.tolist(), 1)
        if a.panes >= 2:
            cv2.line(img, ((x0 + x1) // 2, y0), ((x0 + x1) // 2, y1 - 1), a.frame.tolist(), 1)
        if a.panes >= 3:
            yy = y0 + (y1 - y0) // 3
            cv2.line(img, (x0, yy), (x1 - 1, yy), a.frame.tolist(), 1)
        _fill(img, x0 - 2, y1, x1 + 2, y1 + max(1, int(0.12 * ppm)), trim * 0.9)  # sill
        if rng.random() < inst.lit_p:  # lit at night; the value decides how late it stays on
            self.lit[y0:y1, max(0, x0) : max(0, x1)] = rng.integers(1, 256)

    def _ground_floor(self, a: Archetype, inst: Instance, rng, c0: int, c1: int, trim) -> None:
        img, ppm = self.img, self.ppm
        w = c1 - c0
        rg = self.row(a.ground_h)
        bottom = self.h
        _fill(img, c0, rg - 1, c1, rg + 2, trim)
        if a.ground == "shop":
            sign_r0, sign_r1 = rg + 2, rg + 2 + max(7, int(0.75 * ppm))
            margin = max(2, int(0.4 * ppm))
            _fill(img, c0 + margin, sign_r0, c1 - margin, sign_r1, a.sign_bg)
            self._text(inst.word, c0 + margin, sign_r0, c1 - margin, sign_r1, a)
            shop_top = sign_r1 + 2
            if a.awning:
                aw_r1 = shop_top + int(0.7 * ppm)
                for k, x in enumerate(range(c0 + margin, c1 - margin, max(3, int(0.5 * ppm)))):
                    colour = a.awning_colour if k % 2 == 0 else np.float32([235, 235, 235])
                    _fill(img, x, shop_top, min(c1 - margin, x + max(3, int(0.5 * ppm))), aw_r1, colour)
                shop_top = aw_r1 + 1
            door_w = int(1.1 * ppm)
            door_x = c0 + margin + int(rng.uniform(0.1, 0.8) * max(1, w - 2 * margin - door_w))
            _glass(img, c0 + margin, shop_top, c1 - margin, bottom - int(0.5 * ppm), a.glass * 1.1, rng)
            for x in range(c0 + margin, c1 - margin, max(8, int(2.0 * ppm))):
                _fill(img, x, shop_top, x + 2, bottom, a.frame)
            _fill(img, door_x, shop_top, door_x + door_w, bottom, a.door)
            _glass(img, door_x + 3, shop_top + 3, door_x + door_w - 3, bottom - int(0.9 * ppm), a.glass, rng)
            if rng.random() < inst.lit_p + 0.2:
                self.lit[shop_top : bottom - int(0.5 * ppm), c0 + margin : c1 - margin] = rng.integers(1, 128)
        elif a.ground == "arcade":
            n = max(1, int(round(inst.width_m / 3.2)))
            for k in range(n):
                x0 = c0 + int(k * w / n) + 3
                x1 = c0 + int((k + 1) * w / n) - 3
                if x1 - x0 < 4:
                    continue
                r_arch = rg + int(0.9 * ppm)
                _fill(img, x0, r_arch, x1, bottom, (35, 35, 40))
                cv2.ellipse(img, ((x0 + x1) // 2, r_arch), ((x1 - x0) // 2, int(0.7 * ppm)), 0, 180, 360, (35, 35, 40), -1)
            if rng.random() < 0.5:
                self._text(inst.word, c0 + 4, rg + 2, c1 - 4, rg + 2 + int(0.5 * ppm), a)
        else:  # doors + small windows
            n = max(2, int(round(inst.width_m / a.bay_m)))
            door_k = int(rng.integers(n))
            for k in range(n):
                cx = c0 + int((k + 0.5) * w / n)
                if k == door_k:
                    dw = int(0.65 * ppm)
                    _fill(img, cx - dw - 2, bottom - int(2.6 * ppm) - 2, cx + dw + 2, bottom, trim)
                    _fill(img, cx - dw, bottom - int(2.6 * ppm), cx + dw, bottom, a.door)
                    cv2.line(img, (cx, bottom - int(2.6 * ppm)), (cx, bottom), (20, 20, 20), 1)
                    # a house-number plate: per instance
                    _fill(img, cx + dw + 4, bottom - int(2.0 * ppm), cx + dw + 4 + int(0.35 * ppm), bottom - int(1.7 * ppm), (230, 230, 230))
                else:
                    hw = int(a.win_w * ppm) // 2
                    y1 = bottom - int(1.0 * ppm)
                    y0 = y1 - int(min(a.win_h, a.ground_h - 1.6) * ppm)
                    self._window(a, inst, rng, cx - hw, y0, cx + hw, y1, trim)
                    for x in range(cx - hw + 2, cx + hw, 3):  # bars
                        cv2.line(img, (x, y0), (x, y1 - 1), (30, 30, 30), 1)

    def _text(self, word: str, x0: int, y0: int, x1: int, y1: int, a: Archetype) -> None:
        bw, bh = x1 - x0, y1 - y0
        if bw < 8 or bh < 5:
            return
        (tw, th), _ = cv2.getTextSize(word, a.font, 1.0, 1)
        scale = min((bh * 0.8) / max(1, th), (bw * 0.9) / max(1, tw))
        thick = 1 if scale < 0.7 else 2
        (tw, th), _ = cv2.getTextSize(word, a.font, scale, thick)
        org = (x0 + (bw - tw) // 2, y0 + (bh + th) // 2)
        cv2.putText(self.img, word, org, a.font, scale, a.sign_fg.tolist(), thick, cv2.LINE_AA)


def _zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(w / w.sum())


def paint_wall(cfg: SynthConfig, archetypes: list[Archetype], weights: np.ndarray, length_m: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One wall strip of `length_m`: (bgr, alpha, lit)."""
    ppm = cfg.pixels_per_m
    width_px = int(np.ceil(length_m * ppm))
    painter = StripPainter(width_px, cfg)
    x = -rng.uniform(0, cfg.building_width_m[1])  # random phase
    while x < length_m:
        arch = archetypes[rng.choice(len(archetypes), p=weights)]
        inst = make_instance(arch, rng, cfg)
        c0, c1 = int(round(x * ppm)), int(round((x + inst.width_m) * ppm))
        painter.building(inst, max(0, c0), min(width_px, c1))
        x += inst.width_m
    return painter.img, painter.alpha, painter.lit


def paint_ground(cfg: SynthConfig, width_m: float, length_m: float, rng: np.random.Generator) -> np.ndarray:
    """Ground strip (BGR): rows run across the street from the left wall (row 0) to the right wall."""
    g = cfg.ground_pixels_per_m
    h, w = int(round(width_m * g)), int(np.ceil(length_m * g))
    asphalt = rng.uniform(55, 95)
    img = np.empty((h, w, 3), np.float32)
    img[:] = asphalt + rng.normal(0, 3, 3)
    sw = int(round(cfg.sidewalk_m * g))
    pave = _hsv(rng.uniform(0, 30), rng.uniform(0, 40), rng.uniform(130, 190))
    img[:sw] = pave
    img[h - sw :] = pave
    img += rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    low = cv2.resize(rng.normal(0, 1, (max(2, h // 10), max(2, w // 10))).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img *= (1 + 0.06 * low)[:, :, None]
    out = np.clip(img, 0, 255).astype(np.uint8)
    tile = max(4, int(rng.uniform(0.5, 1.2) * g))
    for x in range(0, w, tile):
        cv2.line(out, (x, 0), (x, sw - 1), (pave * 0.75).tolist(), 1)
        cv2.line(out, (x, h - sw), (x, h - 1), (pave * 0.75).tolist(), 1)
    for r in (sw, h - sw - 1):  # curbs
        cv2.line(out, (0, r), (w - 1, r), (200, 200, 200), 2)
    mid = h // 2
    yellow = rng.random() < 0.4
    colour = (40, 190, 220) if yellow else (225, 225, 225)
    dash, gap = int(3 * g), int(rng.uniform(3, 9) * g)
    if rng.random() < 0.3:
        cv2.line(out, (0, mid - 1), (w - 1, mid - 1), colour, 1)
        cv2.line(out, (0, mid + 1), (w - 1, mid + 1), colour, 1)
    else:
        for x in range(0, w, dash + gap):
            cv2.line(out, (x, mid), (x + dash, mid), colour, 2)
    for _ in range(max(1, int(length_m / 60))):  # crossings
        x = int(rng.uniform(0, w - 4 * g))
        for r in range(sw + 2, h - sw - 2, max(3, int(0.9 * g))):
            _fill(out, x, r, x + int(3 * g), r + max(2, int(0.45 * g)), (225, 225, 225))
    for _ in range(int(length_m / 15)):  # patches and manholes
        x, r = int(rng.uniform(0, w)), int(rng.uniform(sw, h - sw))
        if rng.random() < 0.5:
            cv2.circle(out, (x, r), int(0.35 * g), (45, 45, 50), -1)
        else:
            cv2.rectangle(out, (x, r), (x + int(rng.uniform(1, 4) * g), r + int(rng.uniform(0.5, 2) * g)), (asphalt * 0.8,) * 3, -1)
    return out


@dataclass
class StreetScene:
    """Everything drawn for one street: strips and props, in the street frame."""

    width: float  # wall-to-wall
    x_start: float  # street x of strip column 0 (left wall, ground); the right wall runs backwards
    left: tuple[np.ndarray, np.ndarray, np.ndarray]
    right: tuple[np.ndarray, np.ndarray, np.ndarray]
    ground: np.ndarray
    props: list[tuple[str, float, float, float, tuple]]  # (kind, x, y, height_m, colour)
    backdrop: tuple


def build_street(street: int, cfg: SynthConfig, archetypes: list[Archetype] | None = None) -> StreetScene:
    """Paint one street (deterministic in cfg.seed and the street index)."""
    archetypes = archetypes or make_archetypes(cfg)
    rng = np.random.default_rng([cfg.seed, 201, street])
    width = float(street_width(cfg, street))
    pad = cfg.render_depth_m + cfg.street_width_m + cfg.street_width_jitter_m
    length = cfg.street_length_m + 2 * pad
    # each street (district) has its own mix of the city's archetypes: its own character,
    # while every archetype still recurs on other streets
    weights = _zipf_weights(len(archetypes), cfg.archetype_zipf, np.random.default_rng([cfg.seed, 102, street]))
    left = paint_wall(cfg, archetypes, weights, length, rng)
    right = paint_wall(cfg, archetypes, weights, length, rng)
    ground = paint_ground(cfg, width, length, rng)
    props = []
    inner = width / 2 - cfg.sidewalk_m + 0.4
    for side in (1, -1):
        spacing = rng.uniform(18, 35)
        x = -pad + rng.uniform(0, spacing)
        while x < cfg.street_length_m + pad:
            if rng.random() < 0.55:
                props.append(("lamp", x, side * inner, rng.uniform(4.5, 6.5), (40, 40, 45)))
            else:
                g = _hsv(rng.uniform(35, 70), rng.uniform(90, 200), rng.uniform(50, 130))
                props.append(("tree", x, side * inner, rng.uniform(4.0, 7.0), tuple(float(c) for c in g)))
            x += spacing * rng.uniform(0.7, 1.3)
    backdrop = (rng.uniform(8, 25), tuple(float(c) for c in _hsv(rng.uniform(90, 120), rng.uniform(5, 40), rng.uniform(120, 180))))
    return StreetScene(width, -pad, left, right, ground, props, backdrop)
