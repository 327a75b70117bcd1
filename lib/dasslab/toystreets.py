"""ToyStreets: procedural street scenes with a real synthetic-to-real style domain gap.

One layout distribution (a street in perspective: sky, facades with windows, road with lane marks,
sidewalks, terrain, trees, poles with signs and traffic lights, cars, pedestrians) is rendered in
two looks. The *source* ("game") look paints every instance in a flat, saturated colour with hard
edges and no noise. The *target* ("camera") look covers the same surfaces with textures cut from
real photographs shipped with scikit-image, under another colour balance and lighting (exposure,
white balance, cast shadows, sky gradient), then optical blur, vignetting and sensor noise. Adverse
conditions (night, fog, rain, snow) are applied on top of the camera look for the zero-shot
protocol. Labels are Cityscapes train ids and never depend on the look.

Everything is vectorised numpy over the pixel grid; geometry lives in image-relative coordinates,
so a layout renders at any size. ``generate`` writes the three real layouts (GTA5 / Cityscapes /
ACDC) so the benchmark is read by the real readers.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from dasslab import labels as L

DOMAINS = ("source", "target")
CONDITIONS = ("day", "night", "fog", "rain", "snow")
ADVERSE = ("night", "fog", "rain", "snow")
#: layout seeds at or above this are never used by any split: use them for outside corpora
CORPUS_SEED_OFFSET = 10**6
#: each split owns a block of this many consecutive layout seeds below CORPUS_SEED_OFFSET
SPLIT_BLOCK = 50_000
GENERATOR_VERSION = 2

ROAD, SIDEWALK, BUILDING, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY, PERSON, CAR = (
    L.class_index(n) for n in ("road", "sidewalk", "building", "pole", "traffic light", "traffic sign",
                               "vegetation", "terrain", "sky", "person", "car"))
#: the classes a ToyStreets scene can contain
CLASSES_PRESENT = (ROAD, SIDEWALK, BUILDING, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY, PERSON, CAR)

# surface parts: appearance details that do not change the label
P_NONE, P_WINDOW, P_LANE, P_WHEEL, P_GLASS, P_SKIN, P_LEGS, P_TRUNK, P_CURB, P_LAMP, P_FACE, P_TAIL, P_SLAB = range(13)


# --------------------------------------------------------------------------- layout


@dataclass
class Scene:
    """A rasterised layout: per-pixel class, instance, surface part and depth, plus light sources."""

    label: np.ndarray                  # uint8 train ids
    inst: np.ndarray                   # int32 instance index into `kinds`
    part: np.ndarray                   # uint8 P_* codes
    depth: np.ndarray                  # float32 distance (sky = 1e3)
    kinds: list = field(default_factory=list)    # per instance: class id
    lamps: list = field(default_factory=list)    # (x, y, radius) in pixels: lamp heads on poles
    lights: list = field(default_factory=list)   # (x, y, radius, kind) car lights ('tail' / 'head')
    horizon: float = 0.4
    facing: dict = field(default_factory=dict)   # instance -> +1/-1 facade orientation (shading)


class _Painter:
    """Painter's algorithm on the pixel grid; objects are drawn far to near."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.ys = (np.arange(h, dtype=np.float32) + 0.5) / h   # pixel centres, image-relative
        self.xs = (np.arange(w, dtype=np.float32) + 0.5) / w
        self.label = np.full((h, w), SKY, np.uint8)
        self.inst = np.zeros((h, w), np.int32)
        self.part = np.zeros((h, w), np.uint8)
        self.depth = np.full((h, w), 1e3, np.float32)
        self.kinds = [SKY]
        self.facing: dict[int, int] = {}
        self.lamps: list = []
        self.lights: list = []

    def new(self, cls: int) -> int:
        self.kinds.append(cls)
        return len(self.kinds) - 1

    def paint(self, mask, cls, inst, depth, part=P_NONE, rows=slice(None), cols=slice(None)):
        if not np.any(mask):
            return
        lab, ins, prt, dep = (a[rows, cols] for a in (self.label, self.inst, self.part, self.depth))
        lab[mask] = cls
        ins[mask] = inst
        prt[mask] = part if np.isscalar(part) else part[mask]
        dep[mask] = depth if np.isscalar(depth) else depth[mask]

    def box(self, x0, x1, y0, y1):
        """Pixel slices and centre grids of an image-relative box (clipped); None when empty."""
        c0, c1 = max(0, int(np.floor(x0 * self.w))), min(self.w, int(np.ceil(x1 * self.w)))
        r0, r1 = max(0, int(np.floor(y0 * self.h))), min(self.h, int(np.ceil(y1 * self.h)))
        if c1 <= c0 or r1 <= r0:
            return None
        return slice(r0, r1), slice(c0, c1), self.ys[r0:r1, None], self.xs[None, c0:c1]


def _thin(x0, x1, w_px):
    """Widen a horizontal extent to at least ~one pixel so thin far objects do not vanish."""
    c, half = (x0 + x1) / 2, max((x1 - x0) / 2, 0.5 / w_px)
    return c - half, c + half


def layout_rng(layout_seed: int, seed: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(layout_seed), 0])


def sample_layout(layout_seed: int, seed: int = 0) -> dict:
    """The scene parameters of one layout (image-relative geometry, world heights in camera units)."""
    rng = layout_rng(layout_seed, seed)
    lay: dict = {}
    lay["hz"] = float(rng.uniform(0.34, 0.5))
    lay["vx"] = float(rng.uniform(0.36, 0.64))
    lay["rc"] = rc = float(rng.uniform(-0.08, 0.08))
    lay["rw"] = rw = float(rng.uniform(0.2, 0.36))
    lay["sw"] = sw = rng.uniform(0.07, 0.2, 2)
    lay["ter"] = ter = np.where(rng.random(2) < 0.45, rng.uniform(0.04, 0.3, 2), 0.0)
    lay["xb"] = [rc - rw - sw[0] - ter[0], rc + rw + sw[1] + ter[1]]   # facade lines, left / right
    lay["zmax"] = zmax = float(rng.uniform(7, 14))
    lay["lane_phase"] = float(rng.random())
    lay["edge_lines"] = bool(rng.random() < 0.5)
    sides = []
    for s in range(2):
        blocks, z = [], float(rng.uniform(0.3, 0.7))
        while z < zmax:
            ln = float(rng.uniform(0.8, 3.5))
            kind = rng.choice(["building", "building", "building", "hedge", "gap"], p=[0.3, 0.25, 0.2, 0.15, 0.1])
            blocks.append({
                "z0": z, "z1": min(z + ln, zmax), "kind": str(kind),
                "h": float(rng.uniform(1.8, 5.0)) if kind == "building" else float(rng.uniform(0.6, 1.6)),
                "wz": float(rng.uniform(0.35, 0.8)), "wh": float(rng.uniform(0.45, 0.75)),
                "wfz": float(rng.uniform(0.35, 0.65)), "wfh": float(rng.uniform(0.4, 0.65)),
                "ground": float(rng.uniform(0.7, 1.1)), "bump": float(rng.uniform(2, 6)), "phase": float(rng.random() * 6.28),
            })
            z += ln
        sides.append(blocks)
    lay["blocks"] = sides
    n_far = int(rng.integers(3, 8))
    edges = np.sort(rng.random(n_far - 1))
    lay["far"] = {"edges": edges.tolist(), "h": rng.uniform(2.0, 9.0, n_far).tolist(),
                  "veg": (rng.random(n_far) < 0.25).tolist()}
    objs = []
    for s in range(2):
        sign = -1 if s == 0 else 1
        edge = rc + sign * rw
        for _ in range(int(rng.poisson(2.2))):  # trees in the sidewalk / terrain strip
            x = edge + sign * (sw[s] * rng.uniform(0.55, 0.95) + ter[s] * rng.random())
            objs.append({"type": "tree", "X": float(x), "Z": float(rng.uniform(0.9, zmax * 0.8)),
                         "r": float(rng.uniform(0.45, 0.9)), "hc": float(rng.uniform(1.6, 2.6)),
                         "tw": float(rng.uniform(0.025, 0.05)), "side": s})
        for _ in range(int(rng.integers(1, 3))):  # poles at the curb
            att = rng.choice(["none", "sign", "light"], p=[0.2, 0.45, 0.35])
            objs.append({"type": "pole", "X": float(edge + sign * rng.uniform(0.02, 0.06)),
                         "Z": float(rng.uniform(0.9, 6.0)), "hp": float(rng.uniform(2.0, 3.2)),
                         "pw": float(rng.uniform(0.018, 0.03)), "att": str(att),
                         "shape": str(rng.choice(["rect", "disc", "tri"])), "ss": float(rng.uniform(0.45, 0.75)),
                         "lamp": bool(rng.random() < 0.6), "side": s})
        for _ in range(int(rng.poisson(1.3))):  # pedestrians on the sidewalk
            objs.append({"type": "person", "X": float(edge + sign * sw[s] * rng.uniform(0.15, 0.85)),
                         "Z": float(rng.uniform(0.9, 6.0)), "hp": float(rng.uniform(1.05, 1.3)),
                         "pw": float(rng.uniform(0.045, 0.065)), "side": s})
    for _ in range(int(rng.poisson(2.4))):  # cars on the road
        lane = rng.choice([-1, 1])
        objs.append({"type": "car", "X": float(rc + lane * rw * rng.uniform(0.35, 0.65)),
                     "Z": float(rng.uniform(1.15, 10.0)), "cw": float(rng.uniform(0.36, 0.46)),
                     "ch": float(rng.uniform(0.55, 0.75)), "cab": float(rng.uniform(0.45, 0.6)),
                     "front": bool(lane < 0)})
    lay["objects"] = sorted(objs, key=lambda o: -o["Z"])
    return lay


def rasterise(lay: dict, size: tuple[int, int]) -> Scene:
    """Draw a layout at (H, W) pixels."""
    h, w = size
    p = _Painter(h, w)
    hz, vx, rc, rw = lay["hz"], lay["vx"], lay["rc"], lay["rw"]
    g = 1.0 - hz
    ys, xs = p.ys[:, None], p.xs[None, :]

    def y_at(hgt, t):  # screen y of a point at world height hgt (camera units) at inverse depth t
        return hz + (1.0 - hgt) * t * g

    # far skyline at the end of the street
    tf = 1.0 / lay["zmax"]
    far = lay["far"]
    seg = np.searchsorted(np.asarray(far["edges"]), p.xs)
    far_h = np.asarray(far["h"])[seg]
    far_top = y_at(far_h, tf)
    far_inst = [p.new(VEG if v else BUILDING) for v in far["veg"]]
    fmask = (ys >= far_top[None, :]) & (ys < y_at(0.0, tf))
    for k, ii in enumerate(far_inst):
        m = fmask & (seg[None, :] == k)
        p.paint(m, p.kinds[ii], ii, lay["zmax"])

    # ground plane
    t_g = np.clip((ys - hz) / g, 1e-4, None)
    ground = ys > hz
    X = (xs - vx) / t_g
    Z = 1.0 / t_g
    road_i, sw_i, ter_i = p.new(ROAD), p.new(SIDEWALK), p.new(TERRAIN)
    d = X - rc
    cls = np.where(np.abs(d) < rw, ROAD, np.where((d > -rw - lay["sw"][0]) & (d < rw + lay["sw"][1]), SIDEWALK, TERRAIN))
    inst = np.where(cls == ROAD, road_i, np.where(cls == SIDEWALK, sw_i, ter_i))
    part = np.zeros_like(cls, dtype=np.uint8)
    lane_w = 0.012
    dash = ((Z * 0.8 + lay["lane_phase"]) % 1.0) < 0.45
    part[(np.abs(d) < lane_w) & dash & (cls == ROAD)] = P_LANE
    if lay["edge_lines"]:
        part[(np.abs(np.abs(d) - (rw - 0.03)) < lane_w * 0.8) & (cls == ROAD)] = P_LANE
    curb = (cls == SIDEWALK) & (np.abs(np.abs(d) - rw) < 0.015)
    part[curb] = P_CURB
    slab = (cls == SIDEWALK) & ~curb & (((Z * 2.5) % 1.0) < 0.08)
    part[slab] = P_SLAB
    gm = np.broadcast_to(ground, cls.shape)
    p.label[gm] = cls[gm]
    p.inst[gm] = inst[gm]
    p.part[gm] = part[gm]
    p.depth[gm] = np.broadcast_to(Z, cls.shape)[gm]

    # facades and hedges, one side at a time (a column sees its side's facade plane)
    for s, xb in enumerate(lay["xb"]):
        with np.errstate(divide="ignore", invalid="ignore"):
            t_col = (p.xs - vx) / xb
        ok = t_col > 0
        z_col = np.where(ok, 1.0 / np.where(ok, t_col, 1.0), np.inf)
        for b in lay["blocks"][s]:
            cols = ok & (z_col >= b["z0"]) & (z_col < b["z1"])
            if not cols.any():
                continue
            c_idx = np.nonzero(cols)[0]
            t = t_col[c_idx][None, :]
            zc = z_col[c_idx][None, :]
            y_base = y_at(0.0, t)
            if b["kind"] == "gap":
                continue
            if b["kind"] == "hedge":
                top = b["h"] + 0.18 * np.sin(zc * b["bump"] + b["phase"])
                cls_b = VEG
            else:
                top = b["h"]
                cls_b = BUILDING
            m = (ys >= y_at(top, t)) & (ys < y_base)
            hgt = 1.0 - (ys - hz) / (t * g)       # world height of each pixel on the facade
            prt = np.zeros(m.shape, np.uint8)
            if cls_b == BUILDING:
                fz = (zc / b["wz"]) % 1.0
                fh = (hgt / b["wh"]) % 1.0
                win = (np.abs(fz - 0.5) < b["wfz"] / 2) & (np.abs(fh - 0.5) < b["wfh"] / 2) & (hgt > b["ground"]) & (hgt < top - 0.25)
                prt[win] = P_WINDOW
            ii = p.new(cls_b)
            p.facing[ii] = 1 if s == 0 else -1
            sub = (slice(None), c_idx)
            lab, ins, pr, dep = (a[sub] for a in (p.label, p.inst, p.part, p.depth))
            dz = np.broadcast_to(zc, m.shape)
            lab[m], ins[m], pr[m], dep[m] = cls_b, ii, prt[m], dz[m]
            p.label[sub], p.inst[sub], p.part[sub], p.depth[sub] = lab, ins, pr, dep

    # objects, far to near
    for o in lay["objects"]:
        t = 1.0 / o["Z"]
        xc = vx + o["X"] * t
        yb = y_at(0.0, t)
        if o["type"] == "tree":
            ii = p.new(VEG)
            tw = o["tw"] * t
            x0, x1 = _thin(xc - tw, xc + tw, w)
            bx = p.box(x0, x1, y_at(o["hc"], t), yb)
            if bx:
                r, c, yy, xx = bx
                m = np.ones((yy.shape[0], xx.shape[1]), bool)
                p.paint(m, VEG, ii, o["Z"], P_TRUNK, r, c)
            rx, ry = o["r"] * t * 0.55, o["r"] * t * g
            cy = y_at(o["hc"], t)
            bx = p.box(xc - rx, xc + rx, cy - ry, cy + ry)
            if bx:
                r, c, yy, xx = bx
                m = ((xx - xc) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1.0
                p.paint(m, VEG, ii, o["Z"], P_NONE, r, c)
        elif o["type"] == "pole":
            ii = p.new(POLE)
            pw = o["pw"] * t
            x0, x1 = _thin(xc - pw, xc + pw, w)
            top = y_at(o["hp"], t)
            bx = p.box(x0, x1, top, yb)
            if bx:
                r, c, yy, xx = bx
                p.paint(np.ones((yy.shape[0], xx.shape[1]), bool), POLE, ii, o["Z"], P_NONE, r, c)
            if o["lamp"]:
                p.lamps.append((xc * w, top * h, max(1.0, 0.5 * t * g * h * 0.35)))
            if o["att"] == "sign":
                jj = p.new(SIGN)
                ss = o["ss"]
                cx, cy = xc, y_at(o["hp"] - ss * 0.7, t)
                hx, hy = ss * t * 0.25, ss * t * g * 0.5
                bx = p.box(cx - hx, cx + hx, cy - hy, cy + hy)
                if bx:
                    r, c, yy, xx = bx
                    u, v = (xx - cx) / hx, (yy - cy) / hy
                    if o["shape"] == "disc":
                        m = u ** 2 + v ** 2 < 1.0
                    elif o["shape"] == "tri":
                        m = (np.abs(u) < (v + 1) / 2) & (v < 1)
                    else:
                        m = (np.abs(u) < 1) & (np.abs(v) < 1)
                    m |= (np.abs(u) < 0.35) & (np.abs(v) < 0.35)   # never lose a far sign entirely
                    p.paint(m, SIGN, jj, o["Z"] * 0.999, P_FACE, r, c)
            elif o["att"] == "light":
                jj = p.new(LIGHT)
                cx, cy = xc, y_at(o["hp"] - 0.35, t)
                hx, hy = 0.1 * t, 0.45 * t * g
                bx = p.box(cx - hx, cx + hx, cy - hy, cy + hy)
                if bx:
                    r, c, yy, xx = bx
                    m = np.ones((yy.shape[0], xx.shape[1]), bool)
                    v = (yy - cy) / hy
                    prt = np.where((np.abs((v * 1.5) % 1.0 - 0.5) < 0.3) & (np.abs(xx - cx) < hx * 0.6), P_LAMP, P_NONE)
                    p.paint(m, LIGHT, jj, o["Z"] * 0.999, np.broadcast_to(prt, m.shape).astype(np.uint8), r, c)
        elif o["type"] == "person":
            ii = p.new(PERSON)
            hp, pw = o["hp"], o["pw"] * t
            top = y_at(hp, t)
            x0, x1 = _thin(xc - pw, xc + pw, w)
            bx = p.box(x0, x1, top, yb)
            if bx:
                r, c, yy, xx = bx
                v = (yy - top) / max(yb - top, 1e-6)  # 0 head .. 1 feet
                u = (xx - (x0 + x1) / 2) / max((x1 - x0) / 2, 1e-6)
                head = (v < 0.14) & (np.abs(u) < 0.55)
                body = (v >= 0.14) & (v < 0.55) & (np.abs(u) < 1.0)
                legs = (v >= 0.55) & (np.abs(np.abs(u) - 0.45) < 0.38)
                m = head | body | legs | (np.abs(u) < 0.35)
                prt = np.where(head, P_SKIN, np.where(v >= 0.55, P_LEGS, P_NONE)).astype(np.uint8)
                p.paint(m, PERSON, ii, o["Z"], prt, r, c)
        elif o["type"] == "car":
            ii = p.new(CAR)
            hw = o["cw"] * t / 2
            top = y_at(o["ch"], t)
            bx = p.box(xc - hw, xc + hw, top, yb)
            if bx:
                r, c, yy, xx = bx
                u = (xx - xc) / hw
                v = (yy - top) / max(yb - top, 1e-6)   # 0 roof .. 1 ground
                cab = o["cab"]
                roof = v < cab
                m = np.where(roof, np.abs(u) < 0.78 + 0.2 * v / cab, np.abs(u) < 1.0)
                prt = np.zeros(m.shape, np.uint8)
                prt[roof & (v > 0.12) & (np.abs(u) < 0.66 + 0.2 * v / cab)] = P_GLASS
                prt[(v > 0.86) & (np.abs(np.abs(u) - 0.68) < 0.2)] = P_WHEEL
                lamp = (v > cab + 0.08) & (v < cab + 0.22) & (np.abs(u) > 0.72) & (np.abs(u) < 0.95)
                prt[lamp] = P_TAIL
                p.paint(m, CAR, ii, o["Z"], prt, r, c)
                kind = "head" if o["front"] else "tail"
                ly = (top + (cab + 0.15) * (yb - top)) * h
                for sx in (-0.83, 0.83):
                    p.lights.append(((xc + sx * hw) * w, ly, max(0.6, hw * w * 0.12), kind))
    return Scene(p.label, p.inst, p.part, p.depth, p.kinds, p.lamps, p.lights, hz, p.facing)


# --------------------------------------------------------------------------- textures


_TEXTURE_SOURCES = {  # name -> skimage.data function, what it stands in for
    "gravel": "gravel",    # asphalt
    "brick": "brick",      # paving, masonry
    "grass": "grass",      # foliage, lawns
    "moon": "moon",        # weathered concrete, soil
    "rocket": "rocket",    # colour photo: sky / trees / dusk light
    "coffee": "coffee",    # colour photo: fabrics, car paint reflections
    "chelsea": "chelsea",  # colour photo: fur/fabric texture for clothing
    "astronaut": "astronaut",
}


@cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, _TEXTURE_SOURCES[name])()
    return np.asarray(img, dtype=np.float32) / 255.0


@lru_cache(maxsize=64)
def texture(name: str, width: int) -> np.ndarray:
    """A photo rescaled to this image width's scale, as zero-mean luminance detail (H, W) or colour.

    Grey photos give a relative-detail map (mean 1, texture contrast kept from the photo); colour
    photos give RGB in [0, 1]. Scale: the photo's width spans ~2 image widths.
    """
    img = _photo(name)
    scale = min(1.0, 2.0 * width / img.shape[1])
    if scale < 1.0:
        from PIL import Image

        hh, ww = max(8, int(img.shape[0] * scale)), max(8, int(img.shape[1] * scale))
        if img.ndim == 2:
            img = np.asarray(Image.fromarray(img).resize((ww, hh), Image.BILINEAR))
        else:
            img = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(img[..., k])).resize((ww, hh), Image.BILINEAR))
                            for k in range(3)], -1)
    if img.ndim == 2:
        detail = img / max(img.mean(), 1e-3)
        std = detail.std()
        # downscaling removes contrast; keep enough that the material still reads as textured
        detail = 1.0 + (detail - 1.0) * max(1.0, 0.22 / max(std, 1e-3))
        return np.clip(detail, 0.2, 2.0).astype(np.float32)
    return img.astype(np.float32)


def _sample(tex: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Nearest sampling with wrap-around (u along width, v along height, in texture pixels)."""
    th, tw = tex.shape[:2]
    return tex[np.floor(v).astype(np.int64) % th, np.floor(u).astype(np.int64) % tw]


# --------------------------------------------------------------------------- looks


def _hsv(h, s, v):
    import colorsys

    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


def _game_colour(cls: int, rng) -> np.ndarray:
    """Stylised, saturated per-instance colours of the source look (not the label palette)."""
    u = rng.uniform
    if cls == ROAD:
        return _hsv(0.62, u(0.05, 0.15), u(0.3, 0.38))
    if cls == SIDEWALK:
        return _hsv(u(0.08, 0.12), u(0.1, 0.2), u(0.72, 0.82))
    if cls == BUILDING:
        return _hsv(rng.choice([0.05, 0.09, 0.13, 0.58, 0.0]) + u(-0.02, 0.02), u(0.25, 0.5), u(0.62, 0.88))
    if cls == VEG:
        return _hsv(u(0.26, 0.33), u(0.65, 0.85), u(0.5, 0.68))
    if cls == TERRAIN:
        return _hsv(u(0.17, 0.21), u(0.5, 0.7), u(0.6, 0.72))
    if cls == SKY:
        return _hsv(u(0.55, 0.58), u(0.45, 0.6), u(0.92, 1.0))
    if cls == POLE:
        return _hsv(0.6, 0.08, u(0.45, 0.55))
    if cls == SIGN:
        return _hsv(rng.choice([0.0, 0.6, 0.14]), 0.85, 0.9)
    if cls == LIGHT:
        return _hsv(0.3, 0.6, u(0.2, 0.28))
    if cls == PERSON:
        return _hsv(u(0, 1), u(0.6, 0.9), u(0.6, 0.9))
    if cls == CAR:
        return _hsv(u(0, 1), u(0.75, 0.95), u(0.65, 0.95))
    return np.array([0.5, 0.5, 0.5], np.float32)


def _camera_colour(cls: int, rng) -> np.ndarray:
    """Muted, photographic per-instance albedos of the target look."""
    u = rng.uniform
    if cls == ROAD:
        return _hsv(u(0.05, 0.12), u(0.03, 0.1), u(0.3, 0.42))
    if cls == SIDEWALK:
        return _hsv(u(0.03, 0.1), u(0.1, 0.25), u(0.55, 0.68))
    if cls == BUILDING:
        return _hsv(u(0.02, 0.12), u(0.1, 0.45), u(0.35, 0.75))
    if cls == VEG:
        return _hsv(u(0.2, 0.3), u(0.45, 0.65), u(0.3, 0.45))
    if cls == TERRAIN:
        return _hsv(u(0.12, 0.18), u(0.35, 0.5), u(0.45, 0.55))
    if cls == SKY:
        return _hsv(u(0.56, 0.6), u(0.08, 0.22), u(0.78, 0.9))
    if cls == POLE:
        return _hsv(u(0.05, 0.6), 0.05, u(0.3, 0.45))
    if cls == SIGN:
        return _hsv(rng.choice([0.0, 0.6, 0.12]), u(0.6, 0.8), u(0.6, 0.8))
    if cls == LIGHT:
        return _hsv(0.1, 0.1, u(0.12, 0.2))
    if cls == PERSON:
        return _hsv(u(0, 1), u(0.2, 0.6), u(0.2, 0.6))
    if cls == CAR:
        return _hsv(u(0, 1), u(0.0, 0.6), rng.choice([0.15, 0.3, 0.5, 0.7]) + u(-0.05, 0.05))
    return np.array([0.5, 0.5, 0.5], np.float32)


def _colours(scene: Scene, rng, fn) -> np.ndarray:
    return np.stack([fn(k, rng) for k in scene.kinds]).astype(np.float32)


def _blotches(rng, h: int, w: int, cells: tuple[int, int], level: float = 0.0) -> np.ndarray:
    """A crisp two-tone pattern (bool H x W) whose shapes scale with the image, not the pixel grid."""
    low = rng.normal(size=cells).astype(np.float32)
    up = ndimage.zoom(low, (h / cells[0], w / cells[1]), order=1, mode="nearest", grid_mode=True)[:h, :w]
    if up.shape != (h, w):
        up = np.pad(up, ((0, h - up.shape[0]), (0, w - up.shape[1])), mode="edge")
    return up > level


def render_game(scene: Scene, rng) -> np.ndarray:
    """Source look: flat per-instance colours, hard edges, no noise (float RGB in [0, 1]).

    Like a game's hand-made textures, some materials carry crisp two-tone detail (foliage clumps,
    grass patches, asphalt repairs, cartoon clouds): flat regions, hard edges, nothing stochastic
    at the pixel scale.
    """
    h, w = scene.label.shape
    col = _colours(scene, rng, _game_colour)
    img = col[scene.inst]
    part = scene.part
    lab = scene.label
    for cls, cells, level, dark in ((VEG, (12, 24), 0.3, 0.72), (TERRAIN, (8, 16), 0.4, 0.85),
                                    (ROAD, (6, 12), 0.9, 0.85), (BUILDING, (4, 8), 0.8, 0.9)):
        m = lab == cls
        if m.any():
            b = _blotches(rng, h, w, cells, level) & m
            img[b] *= dark
    sky = lab == SKY
    if sky.any() and rng.random() < 0.7:
        cl = _blotches(rng, h, w, (5, 8), rng.uniform(0.5, 1.0)) & sky
        img[cl] = (0.97, 0.98, 1.0)
    # flat two-tone shading of facades (lit / shaded side), like a simple game engine
    shade = np.ones(len(scene.kinds), np.float32)
    for ii, f in scene.facing.items():
        shade[ii] = 1.0 if f > 0 else 0.78
    img = img * shade[scene.inst][..., None]
    win_col = _hsv(rng.uniform(0.55, 0.62), 0.5, rng.uniform(0.35, 0.5))
    img[part == P_WINDOW] = win_col
    img[part == P_LANE] = (0.97, 0.97, 0.95)
    img[part == P_CURB] = (0.9, 0.88, 0.85)
    img[part == P_SLAB] = img[part == P_SLAB] * 0.9
    img[part == P_GLASS] = (0.15, 0.2, 0.3)
    img[part == P_WHEEL] = (0.08, 0.08, 0.08)
    img[part == P_TAIL] = (0.95, 0.15, 0.1)
    img[part == P_SKIN] = (0.96, 0.78, 0.62)
    legs = part == P_LEGS
    img[legs] = _hsv(0.62, 0.6, 0.35)
    img[part == P_TRUNK] = (0.45, 0.28, 0.12)
    img[part == P_FACE] = img[part == P_FACE] * 0.95 + 0.05
    img[part == P_LAMP] = (0.2, 0.95, 0.3)
    return np.clip(img, 0, 1)


def render_camera(scene: Scene, rng) -> tuple[np.ndarray, dict]:
    """Target look before the sensor: textured albedo x lighting (float RGB, linear-ish [0, 1])."""
    h, w = scene.label.shape
    col = _colours(scene, rng, _camera_colour)
    lab, part, inst = scene.label, scene.part, scene.inst
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    img = col[inst]
    off = rng.uniform(0, 4096, (len(scene.kinds), 2)).astype(np.float32)
    ou, ov = off[inst, 0], off[inst, 1]

    # ground materials follow the perspective of the plane (texture shrinks toward the horizon)
    t_g = np.clip((ys / h - scene.horizon) / (1 - scene.horizon), 0.02, None)
    gu = (xs - w / 2) / t_g * 0.5 + ou
    gv = h / t_g * 0.6 + ov
    tex = np.ones((h, w), np.float32)
    for cls, name in ((ROAD, "gravel"), (SIDEWALK, "brick"), (TERRAIN, "grass")):
        m = lab == cls
        if m.any():
            tex[m] = _sample(texture(name, w), gu[m], gv[m])
    for cls, name in ((BUILDING, "brick"), (VEG, "grass"), (POLE, "moon"), (PERSON, "moon"), (CAR, "moon"),
                      (SIGN, "moon"), (LIGHT, "moon")):
        m = (lab == cls) & (scene.depth < 999)
        if m.any():
            tex[m] = _sample(texture(name, w), xs[m] + ou[m], ys[m] + ov[m])
    img = img * tex[..., None]

    # colour detail cut from the colour photos: foliage tint and clothing
    veg = lab == VEG
    if veg.any():
        photo = texture("rocket", w)
        pv = _sample(photo, xs[veg] * 0.7 + ou[veg], ys[veg] * 0.7 + ov[veg])
        img[veg] = img[veg] * 0.6 + pv * np.array([0.25, 0.35, 0.15], np.float32)
    per = (lab == PERSON) & (part != P_SKIN)
    if per.any():
        photo = texture("chelsea" if rng.random() < 0.5 else "coffee", w)
        img[per] = 0.5 * img[per] + 0.5 * _sample(photo, xs[per] + ou[per], ys[per] + ov[per]) * 0.7

    # sky: a smooth gradient with soft clouds (low-passed photo detail)
    sky = lab == SKY
    if sky.any():
        top = _hsv(rng.uniform(0.55, 0.6), rng.uniform(0.4, 0.6), rng.uniform(0.8, 0.95))
        bot = _hsv(rng.uniform(0.52, 0.58), rng.uniform(0.12, 0.25), rng.uniform(0.85, 0.97))
        a = np.clip(ys / max(1.0, scene.horizon * h), 0, 1)[..., None]
        grad = top * (1 - a) + bot * a
        cloud = ndimage.gaussian_filter(_sample(texture("moon", w), xs * 0.5 + off[0, 0], ys * 0.5 + off[0, 1]),
                                        max(1.0, w / 40))
        cloud = np.clip((cloud - 1.0) * rng.uniform(1.5, 4.0) + rng.uniform(-0.1, 0.15), 0, 0.8)[..., None]
        skyimg = grad * (1 - cloud) + cloud * 0.95
        img[sky] = skyimg[sky]

    # parts: real-looking materials
    win = part == P_WINDOW
    if win.any():
        refl = _sample(texture("rocket", w), xs[win] * 0.5 + 100, ys[win] * 0.5 + 40)
        img[win] = 0.12 + 0.45 * refl * rng.uniform(0.5, 1.0)
    img[part == P_LANE] = np.array([0.78, 0.76, 0.68], np.float32) * tex[part == P_LANE][:, None]
    img[part == P_CURB] *= 1.25
    img[part == P_SLAB] *= 0.85
    glass = part == P_GLASS
    img[glass] = 0.06 + 0.25 * _sample(texture("coffee", w), xs[glass] + 50, ys[glass] + 20)
    img[part == P_WHEEL] = 0.05
    img[part == P_TAIL] = (0.55, 0.1, 0.08)
    img[part == P_SKIN] = (0.62, 0.47, 0.4)
    img[part == P_LEGS] *= 0.6
    img[part == P_TRUNK] = np.array([0.2, 0.15, 0.1], np.float32) * tex[part == P_TRUNK][:, None]
    img[part == P_LAMP] *= 1.2

    # lighting: shading by surface orientation, a cast shadow across the street, height falloff
    shade = np.ones(len(scene.kinds), np.float32)
    sun_side = 1 if rng.random() < 0.5 else -1
    for ii, f in scene.facing.items():
        shade[ii] = 1.15 if f == sun_side else 0.6
    img *= shade[inst][..., None]
    shadow_edge = rng.uniform(-0.4, 0.4)
    ground = (lab == ROAD) | (lab == SIDEWALK) | (lab == TERRAIN)
    shadow = ground & ((xs / w - 0.5 - shadow_edge * t_g) * sun_side < 0) & (rng.random() < 0.7)
    img[shadow] *= rng.uniform(0.45, 0.65)
    # soft contact shadows under cars
    info = {"sun_side": sun_side}
    return np.clip(img, 0, 1.5), info


def _sensor(img: np.ndarray, rng, noise: float, blur: float) -> np.ndarray:
    """Optics and sensor: white balance, exposure/tone curve, blur, vignetting, noise."""
    h, w = img.shape[:2]
    if blur > 0:
        img = ndimage.gaussian_filter(img, (blur, blur, 0))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
    img = img * (1.0 - rng.uniform(0.18, 0.35) * r2 / 2)[..., None]
    shot = np.sqrt(np.clip(img, 0, None)) * rng.normal(0, 1, img.shape).astype(np.float32) * noise
    read = rng.normal(0, noise * 0.5, (h, w, 1)).astype(np.float32)
    img = img + shot + read
    return np.clip(img, 0, 1)


def _colour_grade(img: np.ndarray, rng) -> np.ndarray:
    """Camera colour balance: a warm or cool cast, exposure and a soft tone curve."""
    temp = rng.uniform(-1, 1)
    gain = np.array([1 + 0.12 * temp, 1.0, 1 - 0.15 * temp], np.float32) * rng.uniform(0.85, 1.1)
    img = img * gain
    img = np.clip(img, 0, None) ** rng.uniform(0.75, 0.95)   # camera gamma: lifted shadows and mids
    return img


def _glow(h, w, points, colour, strength, scale=1.0):
    out = np.zeros((h, w, 3), np.float32)
    if not points:
        return out
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for x, y, r, *_ in points:
        rr = max(0.8, r * scale)
        out += np.exp(-(((xx - x) ** 2 + (yy - y) ** 2) / (2 * rr * rr)))[..., None]
    return out * np.asarray(colour, np.float32) * strength


def apply_condition(img: np.ndarray, scene: Scene, condition: str, rng) -> tuple[np.ndarray, float]:
    """Adverse weather / light on the camera look. Returns the image and extra sensor noise."""
    h, w = img.shape[:2]
    lab, part, depth = scene.label, scene.part, scene.depth
    if condition == "day":
        return img, 0.0
    if condition == "night":
        img = img * rng.uniform(0.08, 0.15) * np.array([0.75, 0.85, 1.15], np.float32)
        yy = np.mgrid[0:h, 0:w][0].astype(np.float32)
        sky = lab == SKY
        glow = np.clip(yy / max(1.0, scene.horizon * h), 0, 1)
        img[sky] = (np.array([0.02, 0.025, 0.06], np.float32) + glow[sky][:, None] * np.array([0.1, 0.07, 0.05], np.float32))
        win = part == P_WINDOW
        lit = win & (_sample(texture("moon", w), np.mgrid[0:h, 0:w][1] * 0.3 + rng.uniform(0, 999), yy * 0.3) > 1.0)
        img[lit] = np.array([0.95, 0.75, 0.4], np.float32) * rng.uniform(0.5, 0.9)
        img[part == P_LAMP] = (0.2, 1.0, 0.4)
        lamps = [(x, y, r) for x, y, r in scene.lamps]
        img += _glow(h, w, lamps, (1.0, 0.8, 0.5), 0.9, 1.5)
        pools = [(x, min(h - 1, y + (h - y) * 0.6), r * 3) for x, y, r in scene.lamps]
        img += _glow(h, w, pools, (0.6, 0.45, 0.3), 0.25, 1.0) * ((lab == ROAD) | (lab == SIDEWALK))[..., None]
        heads = [lt for lt in scene.lights if lt[3] == "head"]
        tails = [lt for lt in scene.lights if lt[3] == "tail"]
        img += _glow(h, w, heads, (1.0, 0.95, 0.85), 1.0)
        img += _glow(h, w, tails, (1.0, 0.1, 0.05), 0.7)
        return np.clip(img, 0, 1.5), rng.uniform(0.05, 0.08)
    if condition == "fog":
        beta = rng.uniform(0.12, 0.3)
        air = np.array([0.78, 0.8, 0.82], np.float32) * rng.uniform(0.85, 1.0)
        tr = np.exp(-beta * np.minimum(depth, 60))[..., None]
        img = img * tr + air * (1 - tr)
        return img, 0.01
    if condition == "rain":
        grey = img.mean(-1, keepdims=True)
        img = (0.55 * img + 0.45 * grey) * rng.uniform(0.6, 0.75)
        sky = lab == SKY
        img[sky] = img[sky] * 0.3 + np.array([0.5, 0.52, 0.56], np.float32)
        wet = (lab == ROAD) | (lab == SIDEWALK)
        img[wet] *= 0.65
        # puddles mirror the sky: bright blotches on the road
        puddle = wet & (ndimage.gaussian_filter(_sample(texture("moon", w), np.mgrid[0:h, 0:w][1] + rng.uniform(0, 999),
                                                        np.mgrid[0:h, 0:w][0] * 2.0), 1.0) > 1.08)
        img[puddle] = img[puddle] * 0.5 + 0.3
        # streaks: slanted short bright lines
        n = int(h * w / 40 * rng.uniform(0.6, 1.2))
        length = max(2, int(h * rng.uniform(0.06, 0.12)))
        slant = rng.uniform(-0.3, 0.3)
        x0 = rng.uniform(0, w, n)
        y0 = rng.uniform(-length, h, n)
        s = np.arange(length, dtype=np.float32)[None, :]
        py = (y0[:, None] + s).astype(np.int64).ravel()
        px = (x0[:, None] + slant * s).astype(np.int64).ravel()
        ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        streak = np.zeros((h, w), np.float32)
        np.add.at(streak, (py[ok], px[ok]), 1.0)
        img = img + np.clip(streak, 0, 1)[..., None] * rng.uniform(0.15, 0.3)
        return np.clip(img, 0, 1.5), 0.02
    if condition == "snow":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        cover = ndimage.gaussian_filter(_sample(texture("moon", w), xx + rng.uniform(0, 999), yy * 1.5), max(0.7, w / 128))
        ground = (lab == ROAD) | (lab == SIDEWALK) | (lab == TERRAIN)
        amount = np.where(lab == ROAD, 0.55, 0.85)[..., None] * np.clip((cover - 0.75) * 3, 0, 1)[..., None]
        snow_col = np.array([0.88, 0.9, 0.95], np.float32)
        img = np.where(ground[..., None], img * (1 - amount) + snow_col * amount, img)
        veg = lab == VEG
        img[veg] = img[veg] * 0.6 + snow_col * 0.35
        img = 0.75 * img + 0.2   # flat winter light
        sky = lab == SKY
        img[sky] = np.array([0.78, 0.8, 0.84], np.float32)
        n = int(h * w / 25 * rng.uniform(0.6, 1.2))
        fy, fx = rng.integers(0, h, n), rng.integers(0, w, n)
        flakes = np.zeros((h, w), np.float32)
        flakes[fy, fx] = rng.uniform(0.5, 1.0, n)
        flakes = ndimage.gaussian_filter(flakes, max(0.4, w / 256)) * 2.0
        img = img + np.clip(flakes, 0, 1)[..., None] * 0.7
        return np.clip(img, 0, 1.5), 0.015
    raise ValueError(f"unknown condition {condition!r}; conditions: {', '.join(CONDITIONS)}")


def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, str):
        try:
            hh, ww = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"size {size!r} must look like HxW, e.g. 64x128") from None
        size = (hh, ww)
    hh, ww = (int(size[0]), int(size[1]))
    if hh < 16 or ww < 16:
        raise ValueError(f"size {hh}x{ww} is too small: ToyStreets needs at least 16x16 pixels")
    return hh, ww


def render(layout_seed: int, size=(32, 64), domain: str = "source", condition: str = "day",
           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 H x W x 3 image, uint8 H x W train ids). Same layout seed -> same labels."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; domains: {', '.join(DOMAINS)}")
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; conditions: {', '.join(CONDITIONS)}")
    if domain == "source" and condition != "day":
        raise ValueError("adverse conditions are variants of the target (camera) look; use domain='target'")
    h, w = _parse_size(size)
    scene = rasterise(sample_layout(layout_seed, seed), (h, w))
    code = DOMAINS.index(domain) * 10 + CONDITIONS.index(condition) + 1
    rng = np.random.default_rng([int(seed), int(layout_seed), code])
    if domain == "source":
        img = render_game(scene, rng)
    else:
        img, _ = render_camera(scene, rng)
        img, extra_noise = apply_condition(img, scene, condition, rng)
        img = _colour_grade(img, rng)
        blur = 0.45 * (w / 64) ** 0.5 * rng.uniform(0.8, 1.3)
        img = _sensor(img, rng, noise=rng.uniform(0.015, 0.035) + extra_noise, blur=blur)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), scene.label.copy()


# --------------------------------------------------------------------------- writing the layouts


def split_seeds(n_train: int, n_val: int, conditions=ADVERSE) -> dict[str, range]:
    """Disjoint layout seeds for every split; all below CORPUS_SEED_OFFSET."""
    names = ["source_train", "source_val", "target_train", "target_val"]
    for c in conditions:
        names += [f"{c}_train", f"{c}_val"]
    if len(names) * SPLIT_BLOCK > CORPUS_SEED_OFFSET:
        raise ValueError("too many splits for the seed space")
    n_cond_train = n_train // 4
    out = {}
    for k, name in enumerate(names):
        if name.startswith(("source", "target")):
            n = n_train if name.endswith("train") else n_val
        else:
            n = n_cond_train if name.endswith("train") else n_val
        if n > SPLIT_BLOCK:
            raise ValueError(f"{name}: {n} images exceed the {SPLIT_BLOCK} layout seeds a split owns")
        out[name] = range(k * SPLIT_BLOCK, k * SPLIT_BLOCK + n)
    return out


def _settings(size, n_train, n_val, seed, conditions) -> dict:
    return {"generator": "dasslab.toystreets", "version": GENERATOR_VERSION, "size": list(size),
            "n_train": int(n_train), "n_val": int(n_val), "seed": int(seed), "conditions": list(conditions)}


def _files(root: Path, split_name: str, i: int, k: int) -> tuple[str, dict]:
    """Where item k (layout seed i) of a split goes, per layout: {kind: path}."""
    part, sp = split_name.rsplit("_", 1)
    if part == "source":
        stem = f"{k + 1 + (0 if sp == 'train' else 50_000):05d}"   # GTA5-style numbers; val from 50001
        return stem, {"image": root / "gta5" / "images" / f"{stem}.png",
                      "ids": root / "gta5" / "labels" / f"{stem}.png"}
    if part == "target":
        city = "toytown" if sp == "train" else "toyval"
        stem = f"{city}_{k // 1000:06d}_{k % 1000:06d}"
        d = root / "cityscapes"
        return stem, {"image": d / "leftImg8bit" / sp / city / f"{stem}_leftImg8bit.png",
                      "ids": d / "gtFine" / sp / city / f"{stem}_gtFine_labelIds.png",
                      "train": d / "gtFine" / sp / city / f"{stem}_gtFine_labelTrainIds.png",
                      "color": d / "gtFine" / sp / city / f"{stem}_gtFine_color.png"}
    seq = f"TOY_{part}_{sp}"
    stem = f"{seq}_frame_{k:06d}"
    d = root / "acdc"
    return stem, {"image": d / "rgb_anon" / part / sp / seq / f"{stem}_rgb_anon.png",
                  "train": d / "gt" / part / sp / seq / f"{stem}_gt_labelTrainIds.png",
                  "ids": d / "gt" / part / sp / seq / f"{stem}_gt_labelIds.png",
                  "color": d / "gt" / part / sp / seq / f"{stem}_gt_labelColor.png"}


def _write_item(files: dict, image: np.ndarray, label: np.ndarray) -> None:
    from dasslab.datasets import save_png

    for kind, path in files.items():
        if kind == "image":
            save_png(path, image)
        elif kind == "ids":
            save_png(path, L.train_to_label_ids(label))
        elif kind == "train":
            save_png(path, label)
        elif kind == "color":
            save_png(path, L.colourise(label))


def generate(root, size=(32, 64), n_train: int = 400, n_val: int = 100, seed: int = 0,
             conditions=ADVERSE, progress: bool = True) -> dict:
    """Write ToyStreets under ``root`` (gta5/, cityscapes/, acdc/); only missing files are rendered.

    ``root/toystreets.json`` records the settings; ``root/.complete`` marks a finished generation.
    A root generated with other settings is an error (pick another root), never silently mixed.
    Returns a summary: counts per split, files written, seconds.
    """
    from dasslab import runs
    from dasslab.datasets import save_png  # noqa: F401  (import check before long work)

    t0 = time.perf_counter()
    root = Path(root).expanduser().resolve()
    size = _parse_size(size)
    conditions = list(conditions or [])
    bad = [c for c in conditions if c not in ADVERSE]
    if bad:
        raise ValueError(f"unknown condition(s) {bad}; adverse conditions: {', '.join(ADVERSE)}")
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train and n_val must be >= 1 (got {n_train}, {n_val})")
    settings = _settings(size, n_train, n_val, seed, conditions)
    meta = root / "toystreets.json"
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise ValueError(f"{root} holds ToyStreets generated with other settings {diff} (old, new); "
                             "use another root for these settings, or delete it")
    elif root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} exists and is not a ToyStreets folder (no toystreets.json); use another root")
    root.mkdir(parents=True, exist_ok=True)
    runs.atomic_save_json(meta, settings)
    marker = root / ".complete"

    seeds = split_seeds(n_train, n_val, conditions)
    written, counts = 0, {}
    todo = sum(len(r) for r in seeds.values())
    bar = runs.progress(total=todo, desc="toystreets", **({} if progress else {"disable": True}))
    for name, rng_seeds in seeds.items():
        part, sp = name.rsplit("_", 1)
        domain = "source" if part == "source" else "target"
        condition = "day" if part in ("source", "target") else part
        stems = []
        for k, ls in enumerate(rng_seeds):
            stem, files = _files(root, name, ls, k)
            stems.append(stem)
            if not all(p.is_file() for p in files.values()):
                img, lab = render(ls, size, domain, condition, seed)
                _write_item({kk: p for kk, p in files.items() if not p.is_file()}, img, lab)
                written += 1
            bar.update(1)
        counts[name] = len(stems)
        if part == "source":
            with runs.atomic_write(root / "gta5" / f"{sp}.txt", "w") as f:
                f.write("\n".join(stems) + "\n")
    bar.close()
    if not marker.is_file():
        runs.atomic_save_json(marker, settings)
    return {"root": str(root), "settings": settings, "counts": counts, "rendered": written,
            "seconds": round(time.perf_counter() - t0, 2)}


def check_generated(root, data: dict | None = None) -> dict:
    """The settings of a finished ToyStreets root; errors say how to make it and what differs."""
    root = Path(root)
    marker = root / ".complete"
    if not marker.is_file():
        raise FileNotFoundError(
            f"ToyStreets data is missing or incomplete in {root}: run notebook 00_data_prep for this profile "
            f"(or `dasslab data toystreets --root {root}`)")
    settings = json.loads(marker.read_text())
    if settings.get("version") != GENERATOR_VERSION:
        raise ValueError(f"ToyStreets in {root} was made by generator version {settings.get('version')}, this is "
                         f"version {GENERATOR_VERSION}: delete the folder (or use another root) and generate again")
    if data is not None:
        want = {"size": list(data.get("size", settings["size"])), "n_train": data.get("n_train", settings["n_train"]),
                "n_val": data.get("n_val", settings["n_val"]), "seed": data.get("seed", settings["seed"])}
        diff = {k: (settings[k], v) for k, v in want.items() if settings[k] != v}
        missing = [c for c in data.get("conditions", []) if c not in settings["conditions"]]
        if diff or missing:
            raise ValueError(f"ToyStreets in {root} was generated with other settings {diff} (on disk, profile)"
                             + (f"; conditions {missing} missing" if missing else "")
                             + ": point data.root elsewhere or regenerate into a fresh root")
    return settings


# --------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="make or check datasets")
    sub = p.add_subparsers(dest="data_command", metavar="DATASET", required=True)
    q = sub.add_parser("toystreets", help="generate the ToyStreets benchmark (GTA5 / Cityscapes / ACDC layouts)")
    q.add_argument("--root", default="data/toystreets", help="output folder")
    q.add_argument("--size", default="64x128", help="HxW, e.g. 32x64 or 64x128")
    q.add_argument("--n-train", type=int, default=400)
    q.add_argument("--n-val", type=int, default=100)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--conditions", default=",".join(ADVERSE),
                   help="comma-separated adverse conditions (empty for none)")
    q.set_defaults(func=_cli_toystreets)


def _cli_toystreets(args: argparse.Namespace) -> int:
    conds = [c.strip() for c in args.conditions.split(",") if c.strip()]
    out = generate(args.root, args.size, args.n_train, args.n_val, args.seed, conds)
    print(json.dumps({k: out[k] for k in ("root", "counts", "rendered", "seconds")}, indent=1))
    return 0
