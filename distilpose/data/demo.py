"""A built-in COCO-format dataset of synthetic people, so the whole job runs without COCO.

Each person is an articulated 17-joint COCO skeleton: a kinematic tree (pelvis -> torso -> neck
-> head; shoulders -> elbows -> wrists; hips -> knees -> ankles) with sampled joint angles,
limb-length ratios, foreshortening, global scale and rotation, and a facing (front: face marks
drawn; back: hair covers the face, whose joints are then unlabelled). Body parts are drawn as
capsules, ellipses and a torso polygon with per-person clothing colours, stripes/checks/noise
textures and shading; the far-side limbs are darker and drawn behind the torso.

Images hold 1-3 people over varied backgrounds (gradients, colour blobs, stripes, random shapes,
limb-like clutter), with random occluder blocks, and people may be cut by the image border.
Labels follow COCO: a joint outside the image is `0, 0, 0`; a joint hidden by another person
or an occluder has `v = 1`; a visible one `v = 2`. The box is the person's drawn silhouette
within the image, `area` its pixel count.

Everything is drawn by OpenCV into a per-person label map and composited with numpy, so the
default 2,300 people take seconds. Randomness comes from generators seeded by
`(seed, split, image index)`: the same seed gives byte-identical JSON and identical images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

from distilpose.data.keypoints import NUM_KEYPOINTS, coco_person_category
from distilpose.progress import progress

_SPLITS = {"train": 0, "val": 1}
_SHIFT = 4  # OpenCV sub-pixel drawing: coordinates are multiplied by 2**_SHIFT
_ONE = 1 << _SHIFT

# Label-map groups of one person's parts; far-side limbs get their own (darker) groups.
_TORSO, _UARM, _FARM, _THIGH, _SHIN = 1, 2, 3, 4, 5
_FAR = 4  # far limb group = near limb group + _FAR (6..9)
_SKIN, _HAIR, _SHOE = 10, 11, 12
_NUM_GROUPS = 13

_SKIN_TONES = np.array(
    [[60, 80, 110], [80, 110, 160], [110, 150, 200], [140, 180, 225], [45, 60, 80]], np.float32
)  # BGR


def _pt(p: np.ndarray) -> tuple[int, int]:
    return int(round(float(p[0]) * _ONE)), int(round(float(p[1]) * _ONE))


def _rot(v: np.ndarray, deg: float) -> np.ndarray:
    """Rotate a 2-D vector by `deg` degrees (clockwise on screen, since y points down)."""
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _sample_person(rng: np.random.Generator, height: float) -> dict:
    """Joints [17, 2] and drawing parameters in a local frame: pelvis at 0, image axes."""
    H = height
    front = rng.random() < 0.7
    f = 1.0 if front else -1.0  # the person's left is on image right when facing the camera
    turn = rng.uniform(0.35, 1.0)  # body width factor: < 1 looks turned sideways
    up = _rot(np.array([0.0, -1.0]), rng.normal(0.0, 10.0))  # torso lean
    right = np.array([-up[1], up[0]])  # image-right perpendicular of the torso
    left = f * right  # towards the person's left side
    down = -up

    j = np.zeros((NUM_KEYPOINTS, 2))
    pelvis = np.zeros(2)
    neck = pelvis + up * 0.30 * H * rng.uniform(0.9, 1.1)
    sw = 0.11 * H * turn * rng.uniform(0.9, 1.15)
    hw = 0.08 * H * turn * rng.uniform(0.9, 1.1)
    j[5], j[6] = neck + left * sw + down * 0.02 * H, neck - left * sw + down * 0.02 * H
    j[11], j[12] = pelvis + left * hw, pelvis - left * hw

    head_up = _rot(up, rng.normal(0.0, 12.0))
    head_r = 0.065 * H * rng.uniform(0.9, 1.1)
    head_c = neck + head_up * (0.1 * H + 0.3 * head_r)
    head_right = np.array([-head_up[1], head_up[0]])
    look = rng.uniform(-0.45, 0.45)  # head turn: face marks shift sideways
    j[0] = head_c + head_right * look * head_r - head_up * 0.35 * head_r
    for k, side in ((1, 1.0), (2, -1.0)):
        j[k] = head_c + head_right * (f * side * 0.38 + look) * head_r + head_up * 0.0
    for k, side in ((3, 1.0), (4, -1.0)):
        j[k] = head_c + head_right * (f * side * 0.92 - 0.4 * look) * head_r

    def foreshorten() -> float:
        return rng.uniform(0.6, 1.0) if rng.random() < 0.4 else 1.0

    for side, (sh, el, wr) in ((1.0, (5, 7, 9)), (-1.0, (6, 8, 10))):
        out = side * left  # outward for this arm
        a = rng.uniform(-25.0, 175.0) if rng.random() < 0.6 else rng.normal(15.0, 12.0)
        t = math.radians(a)
        d1 = math.cos(t) * down + math.sin(t) * out
        j[el] = j[sh] + d1 * 0.18 * H * foreshorten()
        d2 = _rot(d1, rng.uniform(-150.0, 150.0) if rng.random() < 0.7 else rng.normal(0, 10))
        j[wr] = j[el] + d2 * 0.16 * H * foreshorten()
    for side, (hip, kn, an) in ((1.0, (11, 13, 15)), (-1.0, (12, 14, 16))):
        out = side * left
        a = rng.uniform(-30.0, 85.0) if rng.random() < 0.25 else rng.normal(6.0, 10.0)
        t = math.radians(a)
        d1 = math.cos(t) * down + math.sin(t) * out
        j[kn] = j[hip] + d1 * 0.245 * H * foreshorten()
        d2 = _rot(d1, rng.uniform(-120.0, 120.0) if rng.random() < 0.3 else rng.normal(0, 12))
        j[an] = j[kn] + d2 * 0.245 * H * foreshorten()
    return {
        "joints": j,
        "neck": neck,
        "pelvis": pelvis,
        "head_c": head_c,
        "head_r": head_r,
        "front": front,
        "far_left": rng.random() < 0.5,  # which side's limbs are behind the torso
        "height": H,
    }


def _transform_person(p: dict, angle: float, offset: np.ndarray) -> dict:
    """Rotate the local person by `angle` degrees about the pelvis and move it to `offset`."""
    t = math.radians(angle)
    r = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    q = dict(p)
    for key in ("joints", "neck", "pelvis", "head_c"):
        q[key] = np.asarray(p[key]) @ r.T + offset
    return q


def _extent(p: dict) -> tuple[np.ndarray, np.ndarray]:
    pts = np.vstack([p["joints"], p["head_c"][None] - p["head_r"], p["head_c"][None] + p["head_r"]])
    pad = 0.05 * p["height"]
    return pts.min(axis=0) - pad, pts.max(axis=0) + pad


def _draw_labels(p: dict, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Paint one person's parts as group ids into a uint8 label map (painter's order)."""
    lab = np.zeros(shape, np.uint8)
    j, H = p["joints"], p["height"]
    wid = {  # limb widths in px
        _UARM: 0.060 * H,
        _FARM: 0.048 * H,
        _THIGH: 0.080 * H,
        _SHIN: 0.062 * H,
    }
    wid = {g: max(2, int(round(w * rng.uniform(0.8, 1.2)))) for g, w in wid.items()}

    def limb(a: int | np.ndarray, b: int | np.ndarray, g: int, w: int) -> None:
        pa = j[a] if isinstance(a, int) else a
        pb = j[b] if isinstance(b, int) else b
        cv2.line(lab, _pt(pa), _pt(pb), g, w, cv2.LINE_8, _SHIFT)

    def side_parts(side: int, far: bool) -> None:
        sh, el, wr, hip, kn, an = (5, 7, 9, 11, 13, 15) if side == 0 else (6, 8, 10, 12, 14, 16)
        o = _FAR if far else 0
        limb(hip, kn, _THIGH + o, wid[_THIGH])
        limb(kn, an, _SHIN + o, wid[_SHIN])
        foot = j[an] + (j[an] - j[kn]) * 0.12
        cv2.circle(lab, _pt(foot), int(0.035 * H * _ONE), _SHOE, -1, cv2.LINE_8, _SHIFT)
        limb(sh, el, _UARM + o, wid[_UARM])
        limb(el, wr, _FARM + o, wid[_FARM])
        hand = j[wr] + (j[wr] - j[el]) * 0.1
        cv2.circle(lab, _pt(hand), int(0.03 * H * _ONE), _SKIN, -1, cv2.LINE_8, _SHIFT)

    far = 0 if p["far_left"] else 1
    side_parts(far, True)
    # torso: a quadrilateral at least a profile's width, rounded by thick edges
    mid_sh, mid_hip = (j[5] + j[6]) / 2, (j[11] + j[12]) / 2
    min_half = 0.06 * H

    def widen(a: np.ndarray, b: np.ndarray, mid: np.ndarray, extra: float) -> list:
        d = a - b
        n = np.linalg.norm(d)
        half = max(n / 2 + extra, min_half)
        u = d / n if n > 1e-6 else np.array([1.0, 0.0])
        return [mid + u * half, mid - u * half]

    sa, sb = widen(j[5], j[6], mid_sh, 0.02 * H)
    ha, hb = widen(j[11], j[12], mid_hip, 0.035 * H)
    poly = np.array([_pt(sa), _pt(sb), _pt(hb), _pt(ha)], np.int32)
    cv2.fillPoly(lab, [poly], _TORSO, cv2.LINE_8, _SHIFT)
    cv2.polylines(lab, [poly], True, _TORSO, max(2, int(0.04 * H)), cv2.LINE_8, _SHIFT)
    limb(p["neck"], mid_sh, _SKIN, max(2, int(0.05 * H)))
    # head: skin ellipse and hair (a cap in front, most of the head from behind)
    hc, r = p["head_c"], p["head_r"]
    ang = math.degrees(math.atan2(hc[1] - p["neck"][1], hc[0] - p["neck"][0])) + 90.0
    axes = (int(r * 0.9 * _ONE), int(r * _ONE))
    cv2.ellipse(lab, _pt(hc), axes, ang, 0, 360, _SKIN, -1, cv2.LINE_8, _SHIFT)
    head_up = (hc - p["neck"]) / max(np.linalg.norm(hc - p["neck"]), 1e-6)
    if p["front"]:
        cap_c, cap_axes = hc + head_up * 0.6 * r, (int(r * 0.95 * _ONE), int(r * 0.5 * _ONE))
    else:
        cap_c, cap_axes = hc + head_up * 0.1 * r, (int(r * 0.9 * _ONE), int(r * 0.95 * _ONE))
    cv2.ellipse(lab, _pt(cap_c), cap_axes, ang, 0, 360, _HAIR, -1, cv2.LINE_8, _SHIFT)
    side_parts(1 - far, False)
    return lab


def _person_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Colour per label group [G, 3] and whether the group is cloth (gets the texture)."""
    shirt, pants, shoe = rng.uniform(20, 235, (3, 3))
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.85, 1.15, 3)
    hair = rng.uniform(10, 90, 3) if rng.random() < 0.8 else rng.uniform(90, 220, 3)
    lut = np.zeros((_NUM_GROUPS, 3), np.float32)
    cloth = np.zeros(_NUM_GROUPS, bool)
    parts = {
        _TORSO: (shirt, True),
        _UARM: (shirt, True) if rng.random() < 0.85 else (skin, False),
        _FARM: (shirt, True) if rng.random() < 0.5 else (skin, False),
        _THIGH: (pants, True),
        _SHIN: (pants, True) if rng.random() < 0.65 else (skin, False),
    }
    for g, (colour, is_cloth) in parts.items():
        lut[g], cloth[g] = colour, is_cloth
        if g != _TORSO:
            lut[g + _FAR], cloth[g + _FAR] = colour * 0.72, is_cloth
    lut[_SKIN], lut[_HAIR], lut[_SHOE] = skin, hair, shoe
    cloth[_SHOE] = True
    return lut, cloth


def _texture(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Per-pixel brightness factor of a cloth pattern at pixels (xs, ys)."""
    kind = rng.integers(4)
    amp = rng.uniform(0.12, 0.35)
    phi = rng.uniform(0, math.pi)
    period = rng.uniform(3.0, 10.0)
    u = (xs * math.cos(phi) + ys * math.sin(phi)) / period
    v = (-xs * math.sin(phi) + ys * math.cos(phi)) / period
    if kind == 0:  # plain
        return np.ones_like(u)
    if kind == 1:  # stripes
        return 1.0 + amp * np.sign(np.sin(2 * math.pi * u + rng.uniform(0, 6.3)))
    if kind == 2:  # checks
        return 1.0 + amp * np.sign(np.sin(math.pi * u) * np.sin(math.pi * v))
    return 1.0 + amp * np.sin(2 * math.pi * u) * np.cos(2.7 * v)  # wavy print


def _composite(img: np.ndarray, lab: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Paint the labelled person onto img (float32 [H, W, 3]); returns its mask [H, W] bool."""
    lut, cloth = _person_colours(rng)
    mask = lab > 0
    ys, xs = np.nonzero(mask)
    groups = lab[ys, xs]
    factor = np.where(cloth[groups], _texture(rng, xs.astype(np.float32), ys.astype(np.float32)), 1)
    light_dir = _rot(np.array([1.0, 0.0]), rng.uniform(0, 360))
    rel = (xs - p["pelvis"][0]) * light_dir[0] + (ys - p["pelvis"][1]) * light_dir[1]
    factor = factor * (1.0 + rng.uniform(0.0, 0.3) * rel / p["height"])
    img[ys, xs] = np.clip(lut[groups] * factor[:, None].astype(np.float32), 0, 255)
    _face_marks(img, p, lut[_SKIN], rng)
    return mask


def _face_marks(img: np.ndarray, p: dict, skin: np.ndarray, rng: np.random.Generator) -> None:
    """Small distinct marks at the face joints, so the network can find them."""
    j, r = p["joints"], p["head_r"]
    ear = tuple(float(c) for c in skin * 0.6)
    for k in (3, 4):
        cv2.circle(img, _pt(j[k]), int(max(1.2, 0.2 * r) * _ONE), ear, -1, cv2.LINE_AA, _SHIFT)
    if not p["front"]:
        return
    eye = tuple(float(c) for c in rng.uniform(0, 50, 3))
    white = (235.0, 235.0, 235.0)
    for k in (1, 2):
        cv2.circle(img, _pt(j[k]), int(max(1.5, 0.18 * r) * _ONE), white, -1, cv2.LINE_AA, _SHIFT)
        cv2.circle(img, _pt(j[k]), int(max(0.8, 0.09 * r) * _ONE), eye, -1, cv2.LINE_AA, _SHIFT)
    nose = (40.0, 40.0, float(rng.uniform(120, 200)))
    cv2.circle(img, _pt(j[0]), int(max(1.2, 0.14 * r) * _ONE), nose, -1, cv2.LINE_AA, _SHIFT)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Float32 [h, w, 3] background: gradient, colour blobs, stripes or flat, plus clutter."""
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # linear gradient between two colours
        c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        a = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1.0))[..., None]
        img = c0 * (1 - t) + c1 * t
    elif kind == 1:  # smooth colour blobs
        gw, gh = rng.integers(3, 10, 2)
        small = rng.uniform(0, 255, (gh, gw, 3)).astype(np.float32)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    elif kind == 2:  # stripes
        c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        a, period = rng.uniform(0, math.pi), rng.uniform(6, 30)
        s = np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period)
        t = (0.5 + 0.5 * s)[..., None]
        img = c0 * (1 - t) + c1 * t
    else:  # flat colour
        img = np.broadcast_to(rng.uniform(0, 255, 3).astype(np.float32), (h, w, 3))
    img = np.ascontiguousarray(img, dtype=np.float32)
    for _ in range(int(rng.integers(0, 9))):  # random shapes
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        size = rng.uniform(0.04, 0.25) * min(w, h)
        shape = rng.integers(3)
        if shape == 0:
            pts = np.array([[cx - size, cy - size * 0.7], [cx + size, cy + size * 0.7]])
            cv2.rectangle(img, _pt(pts[0]), _pt(pts[1]), colour, -1, cv2.LINE_AA, _SHIFT)
        elif shape == 1:
            cv2.circle(img, _pt((cx, cy)), int(size * _ONE), colour, -1, cv2.LINE_AA, _SHIFT)
        else:
            end = np.array([cx, cy]) + _rot(np.array([2 * size, 0.0]), rng.uniform(0, 360))
            thick = int(rng.integers(1, 6))
            cv2.line(img, _pt((cx, cy)), _pt(end), colour, thick, cv2.LINE_AA, _SHIFT)
    for _ in range(int(rng.integers(0, 4))):  # limb-like distractors in skin or cloth colours
        if rng.random() < 0.5:
            colour = _SKIN_TONES[rng.integers(len(_SKIN_TONES))]
        else:
            colour = rng.uniform(20, 235, 3)
        a = np.array([rng.uniform(0, w), rng.uniform(0, h)])
        b = a + _rot(np.array([rng.uniform(0.1, 0.3) * h, 0.0]), rng.uniform(0, 360))
        thick = int(rng.integers(4, 13))
        cv2.line(img, _pt(a), _pt(b), tuple(float(c) for c in colour), thick, cv2.LINE_8, _SHIFT)
    return img


def _occluder(img: np.ndarray, owner: np.ndarray, target: np.ndarray, rng) -> None:
    """A textured block near `target` (a joint), marked in `owner` as -1."""
    h, w = owner.shape
    size = rng.uniform(0.08, 0.22, 2) * min(w, h)
    c = target + rng.normal(0.0, 0.06 * min(w, h), 2)
    ang = rng.uniform(0, 180)
    colour = rng.uniform(0, 255, 3)
    mask = np.zeros(owner.shape, np.uint8)
    if rng.random() < 0.5:
        box = cv2.boxPoints(((float(c[0]), float(c[1])), (float(size[0]), float(size[1])), ang))
        cv2.fillPoly(mask, [np.round(box * _ONE).astype(np.int32)], 1, cv2.LINE_8, _SHIFT)
    else:
        axes = (int(size[0] * _ONE / 2), int(size[1] * _ONE / 2))
        cv2.ellipse(mask, _pt(c), axes, ang, 0, 360, 1, -1, cv2.LINE_8, _SHIFT)
    ys, xs = np.nonzero(mask)
    shade = 1.0 + 0.2 * np.sin(xs * rng.uniform(0.2, 1.0)) * np.sin(ys * rng.uniform(0.2, 1.0))
    img[ys, xs] = np.clip(colour[None] * shade[:, None], 0, 255)
    owner[ys, xs] = -1


def _render_image(rng: np.random.Generator, num_people: int, size: tuple[int, int]):
    """One synthetic image (uint8 BGR) and its people's labels."""
    w, h = size
    img = _background(rng, w, h)
    owner = np.zeros((h, w), np.int16)  # who painted each pixel last: person k+1, occluder -1
    people = []
    for k in range(num_people):
        base = rng.uniform(0.55, 0.95) if num_people == 1 else rng.uniform(0.45, 0.85)
        p = _sample_person(rng, base * h)
        angle = rng.normal(0.0, 12.0) if rng.random() < 0.85 else rng.uniform(-100.0, 100.0)
        truncate = rng.random() < 0.2
        slot = (k + rng.uniform(0.2, 0.8)) / num_people  # spread people across the width
        for attempt in range(8):
            q = _transform_person(p, angle, np.zeros(2))
            lo, hi = _extent(q)
            slack = 0.3 * (hi - lo) if truncate and attempt < 7 else np.zeros(2)
            x_lo, x_hi = -lo[0] - slack[0], w - hi[0] + slack[0]
            y_lo, y_hi = -lo[1] - slack[1], h - hi[1] + slack[1]
            ox = np.clip(slot * w, x_lo, x_hi) if x_lo <= x_hi else (x_lo + x_hi) / 2
            ox = ox + rng.normal(0.0, 0.05 * w)
            oy = rng.uniform(y_lo, y_hi) if y_lo <= y_hi else (y_lo + y_hi) / 2
            q = _transform_person(p, angle, np.array([ox, oy]))
            j = q["joints"]
            inside = (j[:, 0] >= 0) & (j[:, 0] <= w - 1) & (j[:, 1] >= 0) & (j[:, 1] <= h - 1)
            if inside.sum() >= 8:
                break
        lab = _draw_labels(q, (h, w), rng)
        mask = _composite(img, lab, q, rng)
        owner[mask] = k + 1
        people.append((q, mask))
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
        q, _ = people[int(rng.integers(len(people)))]
        _occluder(img, owner, q["joints"][int(rng.integers(NUM_KEYPOINTS))], rng)

    sigma = rng.uniform(0.0, 0.9)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = img + rng.normal(0.0, rng.uniform(0.0, 6.0), img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    anns = []
    for k, (q, mask) in enumerate(people):
        j = q["joints"]
        px = np.round(j).astype(int)
        inside = (j[:, 0] >= 0) & (j[:, 0] <= w - 1) & (j[:, 1] >= 0) & (j[:, 1] <= h - 1)
        vis = np.zeros(NUM_KEYPOINTS, int)
        for i in np.nonzero(inside)[0]:
            vis[i] = 2 if owner[px[i, 1], px[i, 0]] == k + 1 else 1
        if not q["front"]:
            vis[:3] = 0  # nose and eyes face away: not labelled, as in COCO
        kpts = np.zeros((NUM_KEYPOINTS, 3))
        kpts[vis > 0, :2] = np.round(j[vis > 0], 2)
        kpts[:, 2] = vis
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:  # drawn entirely outside the image: nobody to label
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        anns.append(
            {
                "keypoints": [round(float(v), 2) for v in kpts.reshape(-1)],
                "num_keypoints": int(np.count_nonzero(vis)),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(len(xs)),
                "visible_frac": float(np.mean(vis == 2)),
            }
        )
    return image, anns


def _plan(seed: int, split: int, num_people: int, max_people: int) -> list[int]:
    """People per image, drawn up front so every image has its own generator."""
    rng = np.random.default_rng([seed, split, 1 << 30])
    counts: list[int] = []
    left = num_people
    while left > 0:
        n = min(int(rng.integers(1, max_people + 1)), left)
        counts.append(n)
        left -= n
    return counts


def _detections(rng: np.random.Generator, image_id: int, anns: list[dict], size) -> list[dict]:
    """Jittered GT boxes with scores, plus a few low-scoring false positives."""
    w, h = size
    out = []
    for ann in anns:
        x, y, bw, bh = ann["bbox"]
        cx = x + bw / 2 + rng.normal(0, 0.05) * bw
        cy = y + bh / 2 + rng.normal(0, 0.05) * bh
        bw, bh = bw * math.exp(rng.normal(0, 0.08)), bh * math.exp(rng.normal(0, 0.08))
        x0, y0 = max(0.0, cx - bw / 2), max(0.0, cy - bh / 2)
        x1, y1 = min(float(w), cx + bw / 2), min(float(h), cy + bh / 2)
        score = float(np.clip(0.55 + 0.4 * ann["visible_frac"] + rng.normal(0, 0.05), 0.3, 1.0))
        out.append((x0, y0, x1 - x0, y1 - y0, score))
    for _ in range(int(rng.poisson(0.6))):
        bw, bh = rng.uniform(0.15, 0.5) * w, rng.uniform(0.3, 0.9) * h
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        out.append((x0, y0, bw, bh, float(rng.uniform(0.02, 0.35))))
    return [
        {
            "image_id": image_id,
            "category_id": 1,
            "bbox": [round(float(v), 2) for v in d[:4]],
            "score": round(d[4], 4),
        }
        for d in out
    ]


def _coco_annotation(ann: dict, index: int, image_id: int) -> dict:
    """A COCO person-keypoints record (id `index` + 1) of a person `_render_image` labelled."""
    fields = {k: ann[k] for k in ("bbox", "area", "num_keypoints", "keypoints")}
    return {"id": index + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0, **fields}


def _coco_file(description: str, images: list[dict], annotations: list[dict]) -> dict:
    return {
        "info": {"description": description},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [coco_person_category()],
    }


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")


def _make_split(out_dir: Path, split: str, num_people: int, seed: int, size, max_people, quality):
    code = _SPLITS[split]
    image_dir = out_dir / split / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, dets = [], [], []
    counts = _plan(seed, code, num_people, max_people)
    for i in progress(range(len(counts)), desc=f"demo {split}", unit="img"):
        rng = np.random.default_rng([seed, code, i])
        image, anns = _render_image(rng, counts[i], size)
        image_id, file_name = i + 1, f"{i + 1:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok, "OpenCV could not encode a JPEG"
        (image_dir / file_name).write_bytes(buf.tobytes())
        images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
        annotations += [
            _coco_annotation(ann, len(annotations) + k, image_id) for k, ann in enumerate(anns)
        ]
        if split == "val":
            dets += _detections(np.random.default_rng([seed, 2, i]), image_id, anns, size)
    ann_file = out_dir / "annotations" / f"person_keypoints_{split}.json"
    description = f"DistilPose synthetic demo people ({split}, seed {seed})"
    _write_json(ann_file, _coco_file(description, images, annotations))
    return ann_file, image_dir, dets


def make_demo_data(
    out_dir,
    *,
    num_train: int = 2000,
    num_val: int = 300,
    seed: int = 0,
    image_size: tuple[int, int] = (192, 192),
    max_people: int = 3,
    jpeg_quality: int = 92,
) -> dict[str, Path]:
    """Write a synthetic COCO person-keypoints dataset of `num_train` / `num_val` people.

    Layout: out_dir/{train,val}/images/*.jpg, out_dir/annotations/person_keypoints_{train,val}.json
    and out_dir/annotations/person_detections_val.json (COCO results format). Files of an
    earlier run in the same folder are overwritten. Returns the paths as
    {"train_ann", "train_images", "val_ann", "val_images", "val_dets"}.
    """
    if num_train < 1 or num_val < 1 or max_people < 1:
        raise ValueError("make_demo_data needs num_train, num_val and max_people >= 1")
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    size = (int(image_size[0]), int(image_size[1]))
    args = (seed, size, max_people, jpeg_quality)
    train_ann, train_images, _ = _make_split(out, "train", num_train, *args)
    val_ann, val_images, dets = _make_split(out, "val", num_val, *args)
    val_dets = out / "annotations" / "person_detections_val.json"
    _write_json(val_dets, dets)
    return {
        "train_ann": train_ann,
        "train_images": train_images,
        "val_ann": val_ann,
        "val_images": val_images,
        "val_dets": val_dets,
    }


def make_demo_video(
    path,
    *,
    num_frames: int = 16,
    size: tuple[int, int] = (640, 480),
    max_people: int = 3,
    fps: float = 10.0,
    seed: int = 0,
) -> dict[str, Path]:
    """Write a video of synthetic people (OpenCV's writer, MPEG-4 Part 2 `mp4v`) and its labels.

    Each frame is a fresh demo image of 1..`max_people` people (a test pattern, not motion).
    The labels go beside the video as `<stem>_keypoints.json` (COCO person keypoints, image id =
    frame index, `file_name` = the video's name) and `<stem>_boxes.json` (the ground-truth boxes
    in the COCO detections format, score 1). Returns {"video", "ann", "boxes"}.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = int(size[0]), int(size[1])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot write an mp4v video here")
    images, annotations = [], []
    try:
        for i in range(num_frames):
            rng = np.random.default_rng([seed, 3, i])
            image, anns = _render_image(rng, int(rng.integers(1, max_people + 1)), (w, h))
            writer.write(image)
            images.append({"id": i, "file_name": path.name, "width": w, "height": h})
            annotations += [
                _coco_annotation(a, len(annotations) + k, i) for k, a in enumerate(anns)
            ]
    finally:
        writer.release()
    ann_file = path.with_name(f"{path.stem}_keypoints.json")
    description = f"DistilPose synthetic demo video {path.name} (seed {seed})"
    _write_json(ann_file, _coco_file(description, images, annotations))
    boxes_file = path.with_name(f"{path.stem}_boxes.json")
    boxes = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0}
        for a in annotations
    ]
    _write_json(boxes_file, boxes)
    return {"video": path, "ann": ann_file, "boxes": boxes_file}
