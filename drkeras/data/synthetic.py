"""Procedural colour fundus photographs with lesion masks and ICDRS grades, and the real on-disk
layouts of IDRiD, EyePACS, DDR and Messidor filled with them.

Why synthetic data: the five papers need pixel-level lesion masks *and* image-level grades, and
most DR datasets cannot be redistributed. The generator draws what the papers' mechanisms react
to, so an experiment on it is meaningful rather than a shape check:

- a circular field of view (FOV) on black, clipped at the top and bottom for some cameras, with
  illumination fall-off, uneven lighting, flare and colour casts that differ between "cameras";
- an optic disc (bright, vertically oval, with a paler cup), a darker macula with a foveal
  reflex, and a vessel tree: arteries and veins leave the disc, the temporal arcades arch around
  the macula, branches taper and stop at the foveal avascular zone;
- lesions whose look and size follow the real ones: microaneurysms (MA, tiny dark-red dots),
  haemorrhages (HE, larger irregular dot-blot or flame-shaped red blots), hard exudates (EX,
  sharp bright-yellow dots in clumps or circinate rings), soft exudates (SE, pale fuzzy
  cotton-wool patches along the arcades) and, in proliferative cases, fine tortuous new vessels
  on and around the disc (not a mask channel, as in IDRiD).

Every length is drawn in units of the FOV radius, and random numbers are drawn in the same order
whatever the resolution, so one seed gives the same eye at every ``size`` (only the sensor noise
differs).

Labels follow from what is drawn (International Clinical Diabetic Retinopathy Scale, ICDRS):
0 nothing; 1 microaneurysms only; 2 more than MAs but not severe; 3 severe NPDR, here at least
``SEVERE_HE_PER_QUADRANT`` haemorrhages in each of the four quadrants (a scaled-down "4-2-1 rule":
the clinical threshold is 20 per quadrant); 4 neovascularisation. The risk of macular oedema
follows IDRiD/Messidor: 0 no hard exudate, 1 exudates farther than one disc diameter from the
fovea, 2 within one disc diameter. :func:`messidor_grade` maps the lesion counts onto the Messidor
0-3 definition. ``label_noise`` moves the observed grade one step away from the true one, as a
second grader sometimes does.

Example::

    >>> fundus = generate(7, size=128, grade=3, camera="canon")
    >>> fundus.image.shape, fundus.masks.shape, fundus.true_grade
    ((128, 171, 3), (128, 171, 5), 3)
    >>> root = write_layout("/tmp/raw_idrid", "idrid", size=96)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from PIL import Image, TiffImagePlugin

from drkeras import keys

__all__ = [
    "CAMERAS",
    "DEFAULT_COUNTS",
    "LAYOUTS",
    "SEVERE_HE_PER_QUADRANT",
    "Camera",
    "SyntheticFundus",
    "generate",
    "icdrs_grade",
    "messidor_grade",
    "scaled_counts",
    "write_layout",
]

SEVERE_HE_PER_QUADRANT = 5
_SUB = 16  # cv2 drawing with 4 fractional bits: sub-pixel positions at every resolution
_SHIFT = 4
MA, HE, EX, SE, OD = range(keys.NUM_LESIONS)


@dataclasses.dataclass(frozen=True)
class Camera:
    """How one fundus camera images the retina.

    Attributes:
        name: identifier (``generate(camera=name)``).
        aspect: image width / height.
        fov_radius: FOV radius / image height; above 0.5 the circle is clipped at the top and
            bottom, as in IDRiD's Kowa images.
        gains: RGB colour cast.
        exposure: overall brightness.
        vignette: illumination fall-off towards the FOV border.
        gamma: tone curve exponent.
        noise: sensor noise standard deviation (fraction of full scale).
        blur: optical blur sigma as a fraction of the FOV radius.
        flare: probability of a bright haze at one side of the FOV border.
    """

    name: str
    aspect: float
    fov_radius: float
    gains: Tuple[float, float, float]
    exposure: float
    vignette: float
    gamma: float
    noise: float
    blur: float
    flare: float


CAMERAS: Dict[str, Camera] = {
    c.name: c
    for c in (
        # IDRiD: Kowa VX-10 alpha, 4288x2848, FOV wider than the sensor height.
        Camera("kowa", 4288 / 2848, 0.61, (1.0, 0.93, 0.80), 1.08, 0.30, 1.0, 0.010, 0.002, 0.1),
        # Messidor: Topcon TRC NW6, 1440x960 .. 2304x1536, whole FOV inside the frame.
        Camera("topcon", 1.5, 0.475, (1.0, 0.82, 0.68), 0.95, 0.40, 1.1, 0.012, 0.003, 0.2),
        # A 4:3 camera with a yellower cast (EyePACS mixes many).
        Camera("canon", 4 / 3, 0.49, (1.0, 0.97, 0.70), 1.0, 0.35, 0.9, 0.012, 0.002, 0.2),
        # Dim, strongly vignetted, noisy images, as many EyePACS ones are.
        Camera("dim", 4 / 3, 0.46, (0.95, 0.78, 0.70), 0.62, 0.55, 1.25, 0.022, 0.004, 0.4),
        # Square frame with a slightly greener cast (DDR mixes many hospitals).
        Camera("square", 1.0, 0.48, (0.92, 1.0, 0.86), 1.0, 0.35, 1.0, 0.014, 0.003, 0.3),
    )
}
_CAMERA_NAMES = tuple(CAMERAS)

# Reflectance colours (linear RGB, before illumination and camera gains).
_COLOURS = {
    "retina_light": (0.88, 0.43, 0.19),
    "retina_dark": (0.62, 0.24, 0.11),
    "vein": (0.40, 0.08, 0.06),
    "artery": (0.66, 0.20, 0.10),
    "disc_rim": (1.0, 0.72, 0.44),
    "disc_cup": (1.0, 0.93, 0.76),
    "MA": (0.40, 0.06, 0.04),
    "HE": (0.42, 0.07, 0.04),
    "EX": (1.0, 0.93, 0.42),
    "SE": (0.96, 0.86, 0.72),
    "NV": (0.55, 0.10, 0.06),
}


@dataclasses.dataclass
class SyntheticFundus:
    """One generated photograph and everything known about it.

    Attributes:
        image: uint8 ``HxWx3`` RGB.
        masks: uint8 ``HxWx5`` in {0, 1}, lesion order ``keys.LESIONS`` (MA, HE, EX, SE, OD).
        grade: the observed ICDRS grade (0-4), after grader label noise.
        dme: risk of macular oedema (0-2) from the hard exudates drawn.
        true_grade: the ICDRS grade of the lesions drawn (no noise).
        camera: name of the camera in ``CAMERAS``.
        eye: ``"left"`` or ``"right"`` (the optic disc is on the image side of that name).
        lesion_counts: lesions drawn inside the FOV: ``MA``, ``HE``, ``EX`` (dots), ``SE``,
            ``NV`` (new-vessel loops) and ``HE_quadrants`` (haemorrhages per quadrant).
        od_center: optic disc centre ``(x, y)`` in pixels.
        od_radius: optic disc radius in pixels.
        fovea: fovea centre ``(x, y)`` in pixels.
    """

    image: np.ndarray
    masks: np.ndarray
    grade: int
    dme: int
    true_grade: int
    camera: str
    eye: str
    lesion_counts: Dict[str, object]
    od_center: Tuple[float, float]
    od_radius: float
    fovea: Tuple[float, float]


def icdrs_grade(counts: Mapping[str, object]) -> int:
    """ICDRS grade (0-4) of a set of lesions.

    Args:
        counts: ``MA``, ``HE``, ``EX``, ``SE``, ``NV`` counts and ``HE_quadrants`` (four
            haemorrhage counts), as in ``SyntheticFundus.lesion_counts``.

    Returns:
        4 with new vessels; 3 with at least ``SEVERE_HE_PER_QUADRANT`` haemorrhages in every
        quadrant (the haemorrhage arm of the 4-2-1 rule, scaled down); 2 with any haemorrhage or
        exudate; 1 with microaneurysms only; 0 otherwise (Wilkinson et al. 2003, ICDRS).

    Example::

        >>> icdrs_grade({"MA": 3, "HE": 0, "EX": 0, "SE": 0, "NV": 0, "HE_quadrants": (0,) * 4})
        1
    """
    if counts["NV"] > 0:
        return 4
    if min(counts["HE_quadrants"]) >= SEVERE_HE_PER_QUADRANT:
        return 3
    if counts["HE"] + counts["EX"] + counts["SE"] > 0:
        return 2
    return 1 if counts["MA"] > 0 else 0


def messidor_grade(counts: Mapping[str, object]) -> int:
    """Messidor retinopathy grade (0-3) of a set of lesions (docs/datasets.md section 3).

    0: no MA and no haemorrhage; 1: 1-5 MAs, no haemorrhage; 2: 6-14 MAs or 1-4 haemorrhages,
    no new vessels; 3: 15+ MAs, 5+ haemorrhages or new vessels.

    Example::

        >>> messidor_grade({"MA": 7, "HE": 0, "NV": 0})
        2
    """
    ma, he, nv = counts["MA"], counts["HE"], counts["NV"]
    if ma >= 15 or he >= 5 or nv > 0:
        return 3
    if ma > 5 or he > 0:
        return 2
    return 1 if ma > 0 else 0


# --------------------------------------------------------------------------------------------
# Drawing helpers


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points, np.float64) * _SUB).astype(np.int32)


def _ellipse(canvas, centre, axes, angle_deg, value) -> None:
    cx, cy = _fixed(centre)
    ax, ay = _fixed(np.maximum(axes, 0.5))
    cv2.ellipse(
        canvas,
        (int(cx), int(cy)),
        (int(ax), int(ay)),
        float(angle_deg),
        0,
        360,
        value,
        -1,
        cv2.LINE_8,
        _SHIFT,
    )


def _smooth_noise(rng: np.random.Generator, cells: int, shape: Tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-ish random field varying over ``cells`` cells across the image."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.3:
        return a
    return cv2.GaussianBlur(a, (0, 0), float(sigma))


def _blend(refl: np.ndarray, alpha: np.ndarray, colour) -> None:
    # Most layers (disc, reflex, a few lesions) cover a small part of the image: blend only the
    # bounding box of the non-zero alpha, which keeps a 256 px image well under 0.1 s.
    rows = np.flatnonzero(alpha.max(axis=1) > 1e-3)
    if rows.size == 0:
        return
    cols = np.flatnonzero(alpha[rows[0] : rows[-1] + 1].max(axis=0) > 1e-3)
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    region = refl[box]
    region += alpha[box][..., None] * (np.asarray(colour, np.float32) - region)


class _Eye:
    """Geometry of one eye in pixels; ``u`` is the FOV radius, every size is a multiple of it."""

    def __init__(self, rng, camera: Camera, height: int, width: int, eye: str):
        self.h, self.w = height, width
        self.u = camera.fov_radius * height
        jitter = rng.uniform(-0.02, 0.02, 2) * height
        self.centre = np.array([(width - 1) / 2 + jitter[0], (height - 1) / 2 + jitter[1]])
        side = 1.0 if eye == "right" else -1.0
        self.od_r = rng.uniform(0.125, 0.145) * self.u
        self.od = (
            self.centre
            + np.array([side * rng.uniform(0.40, 0.50), rng.uniform(-0.06, 0.06)]) * self.u
        )
        dd = 2 * self.od_r
        self.fovea = self.od + np.array(
            [-side * 2.5 * dd * rng.uniform(0.9, 1.1), self.od_r * rng.uniform(0.0, 0.4)]
        )
        self.od_axes = self.od_r * np.array([rng.uniform(0.88, 0.98), rng.uniform(1.0, 1.1)])

    def valid(self, p: np.ndarray, margin: float = 0.92) -> np.ndarray:
        """Points (N, 2) inside the FOV (radius ``margin``), inside the frame, off the disc."""
        p = np.atleast_2d(p)
        in_fov = np.linalg.norm(p - self.centre, axis=1) < margin * self.u
        in_frame = (p[:, 1] > 0.01 * self.h) & (p[:, 1] < 0.99 * self.h)
        off_disc = np.linalg.norm(p - self.od, axis=1) > 1.4 * self.od_r
        return in_fov & in_frame & off_disc

    def quadrant(self, p: np.ndarray) -> np.ndarray:
        p = np.atleast_2d(p)
        return (p[:, 1] > self.centre[1]).astype(int) * 2 + (p[:, 0] > self.centre[0])


# --------------------------------------------------------------------------------------------
# Vessels


def _walk(rng, start, angle, n_steps, step, curvature, wiggle, eye: _Eye, stop_fovea: float):
    """A random-walk polyline from ``start``; stops outside the FOV or at the fovea."""
    # low-pass turning noise: vessels bend smoothly instead of kinking at every step
    noise = np.convolve(rng.normal(0.0, wiggle, n_steps + 2), np.ones(3) / np.sqrt(3), "valid")
    turns = curvature + noise
    angles = angle + np.cumsum(turns)
    deltas = step * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    pts = np.vstack([start, start + np.cumsum(deltas, axis=0)])
    out = np.linalg.norm(pts - eye.centre, axis=1) > 1.03 * eye.u
    near_fovea = np.linalg.norm(pts - eye.fovea, axis=1) < stop_fovea
    stop = np.flatnonzero(out | near_fovea)
    end = stop[0] if stop.size and stop[0] > 0 else len(pts)
    return pts[:end], np.concatenate([[angle], angles])[:end]


def _branches(rng, path, angles, width, depth, eye: _Eye, segments: list, min_width: float):
    segments.append((path, width))
    if depth >= 3 or len(path) < 8:
        return
    step = 0.02 * eye.u
    i = int(rng.integers(4, 12))
    side = 1.0 if rng.random() < 0.5 else -1.0
    while i < len(path) - 3:
        child_w = width * rng.uniform(0.5, 0.72)
        if child_w >= min_width:
            remaining = len(path) - i
            n = int(remaining * rng.uniform(0.35, 0.75)) + 4
            child, child_angles = _walk(
                rng,
                path[i],
                angles[i] + side * rng.uniform(0.45, 1.1),
                n,
                step,
                rng.normal(0, 0.02),
                0.10,
                eye,
                0.07 * eye.u,
            )
            if len(child) >= 3:
                _branches(rng, child, child_angles, child_w, depth + 1, eye, segments, min_width)
        side = -side
        i += int(rng.integers(8, 18))


def _arcade(rng, eye: _Eye, direction: float, scale: float):
    """Temporal arcade: an elliptic arc around the fovea starting at the disc, then a walk."""
    to_od = eye.od - eye.fovea
    a = np.linalg.norm(to_od) * scale
    b = a * rng.uniform(0.85, 1.0)
    u = to_od / np.linalg.norm(to_od)
    v = np.array([-u[1], u[0]]) * direction
    sweep = rng.uniform(1.5, 2.0)
    n = max(8, int(sweep * a / (0.02 * eye.u)))
    t = np.linspace(0.0, sweep, n)
    wobble = 1.0 + 0.03 * np.interp(t, np.linspace(0, sweep, 6), rng.standard_normal(6))
    pts = eye.fovea + (a * np.cos(t) * wobble)[:, None] * u + (b * np.sin(t) * wobble)[:, None] * v
    # the arc starts at a*u from the fovea; shift it so it leaves the disc centre
    pts += eye.od - pts[0]
    d = np.diff(pts, axis=0)
    angles = np.arctan2(d[:, 1], d[:, 0])
    angles = np.concatenate([angles, angles[-1:]])
    tail, tail_angles = _walk(
        rng, pts[-1], angles[-1], 40, 0.02 * eye.u, 0.0, 0.06, eye, 0.07 * eye.u
    )
    inside = np.linalg.norm(pts - eye.centre, axis=1) < 1.03 * eye.u
    keep = np.flatnonzero(~inside)
    end = keep[0] if keep.size else len(pts)
    pts, angles = pts[:end], angles[:end]
    if end == n:
        pts, angles = np.vstack([pts, tail[1:]]), np.concatenate([angles, tail_angles[1:]])
    return pts, angles


def _vessel_tree(rng, eye: _Eye) -> Tuple[list, list]:
    """Arteries and veins as lists of (polyline (N, 2) px, width px)."""
    away = np.arctan2(*(eye.od - eye.fovea)[::-1])
    trees = {"vein": [], "artery": []}
    min_width = 0.004 * eye.u
    for kind, width, scale in (("vein", 0.017, 1.08), ("artery", 0.013, 0.95)):
        w0 = width * eye.u * rng.uniform(0.9, 1.1)
        for direction in (-1.0, 1.0):
            pts, angles = _arcade(rng, eye, direction, scale * rng.uniform(0.97, 1.03))
            _branches(rng, pts, angles, w0, 0, eye, trees[kind], min_width)
            # nasal trunks leave the disc away from the macula, up and down
            angle = away + direction * rng.uniform(0.6, 1.1)
            pts, angles = _walk(
                rng, eye.od, angle, 55, 0.02 * eye.u, -direction * 0.01, 0.07, eye, 0.0
            )
            _branches(rng, pts, angles, w0 * 0.75, 1, eye, trees[kind], min_width)
        # papillomacular twigs run straight towards the fovea and stop short of it
        for _ in range(int(rng.integers(1, 3))):
            angle = away + np.pi + rng.normal(0, 0.35)
            pts, angles = _walk(rng, eye.od, angle, 25, 0.02 * eye.u, 0.0, 0.12, eye, 0.1 * eye.u)
            _branches(rng, pts, angles, w0 * 0.3, 2, eye, trees[kind], min_width)
    return trees["vein"], trees["artery"]


def _draw_vessels(canvas: np.ndarray, segments: list, taper: float = 0.35) -> None:
    """Anti-aliased polylines; thinner-than-a-pixel vessels are drawn fainter, not wider."""
    pieces = []
    for pts, width in segments:
        n = len(pts)
        for s in range(0, n - 1, 6):
            chunk = pts[s : min(n, s + 7)]
            w = width * (1.0 - taper * s / max(n, 1))
            pieces.append((w, chunk))
    pieces.sort(key=lambda item: item[0])  # thick vessels drawn last stay continuous
    for w, chunk in pieces:
        thickness = max(1, int(round(w)))
        value = 255.0 * min(1.0, w)
        cv2.polylines(canvas, [_fixed(chunk)], False, value, thickness, cv2.LINE_AA, _SHIFT)


# --------------------------------------------------------------------------------------------
# Lesions


def _sample_positions(rng, eye: _Eye, n: int, near_macula: float = 0.6) -> np.ndarray:
    """``n`` lesion centres, denser in the posterior pole, inside the FOV and off the disc."""
    out = np.zeros((0, 2))
    for _ in range(20):
        if len(out) >= n:
            break
        k = 2 * (n - len(out)) + 4
        local = eye.fovea + rng.normal(0, 0.38, (k, 2)) * eye.u
        r = np.sqrt(rng.random(k)) * 0.9 * eye.u
        t = rng.uniform(0, 2 * np.pi, k)
        spread = eye.centre + np.stack([r * np.cos(t), r * np.sin(t)], 1)
        cand = np.where((rng.random(k) < near_macula)[:, None], local, spread)
        out = np.vstack([out, cand[eye.valid(cand)]])
    return out[:n]


def _sample_in_quadrant(rng, eye: _Eye, quadrant: int, n: int) -> np.ndarray:
    out = np.zeros((0, 2))
    lo = {0: np.pi, 1: 1.5 * np.pi, 2: 0.5 * np.pi, 3: 0.0}[quadrant]
    for _ in range(30):
        if len(out) >= n:
            break
        k = 2 * (n - len(out)) + 4
        r = np.sqrt(rng.uniform(0.04, 1.0, k)) * 0.88 * eye.u
        t = lo + rng.uniform(0.08, np.pi / 2 - 0.08, k)
        cand = eye.centre + np.stack([r * np.cos(t), r * np.sin(t)], 1)
        ok = eye.valid(cand) & (eye.quadrant(cand) == quadrant)
        out = np.vstack([out, cand[ok]])
    return out[:n]


def _lesion_plan(rng, grade: int) -> Dict[str, object]:
    """How many lesions of each kind to draw for a target ICDRS grade."""
    plan = {"MA": 0, "HE": 0, "HE_per_quadrant": 0, "EX_clusters": 0, "SE": 0, "NV": 0}
    moderate = {
        "MA": int(rng.integers(2, 16)),
        "HE": int(rng.integers(0, 9)),
        "EX_clusters": int(rng.integers(1, 4)) if rng.random() < 0.7 else 0,
        "SE": int(rng.integers(1, 3)) if rng.random() < 0.4 else 0,
    }
    if moderate["HE"] + moderate["EX_clusters"] + moderate["SE"] == 0:
        moderate["HE"] = 1
    severe = {
        "MA": int(rng.integers(10, 31)),
        "HE_per_quadrant": int(rng.integers(SEVERE_HE_PER_QUADRANT, SEVERE_HE_PER_QUADRANT + 4)),
        "EX_clusters": int(rng.integers(1, 5)),
        "SE": int(rng.integers(1, 5)) if rng.random() < 0.7 else 0,
    }
    proliferative_background = severe if rng.random() < 0.5 else moderate
    nv = int(rng.integers(14, 26))
    if grade == 1:
        plan["MA"] = int(rng.integers(1, 7))
    elif grade == 2:
        plan.update(moderate)
    elif grade == 3:
        plan.update(severe)
    elif grade == 4:
        plan.update(proliferative_background)
        plan["NV"] = nv
    return plan


def _exudate_clusters(rng, eye: _Eye, n_clusters: int):
    """Centres and radii of hard-exudate dots: compact clumps or circinate rings."""
    centres, radii = [], []
    dd = 2 * eye.od_r
    for _ in range(n_clusters):
        if rng.random() < 0.5:  # close to the fovea: clinically significant (DME 2)
            c = eye.fovea + rng.normal(0, 0.6, 2) * dd
        else:
            c = _sample_positions(rng, eye, 1, near_macula=0.3)
            c = c[0] if len(c) else eye.fovea + np.array([0.0, 1.5 * dd])
        k = int(rng.integers(5, 22))
        if rng.random() < 0.5:
            ring = rng.uniform(0.05, 0.12) * eye.u
            t0 = rng.uniform(0, 2 * np.pi)
            t = t0 + rng.uniform(0, rng.uniform(2.0, 5.5), k)
            rr = ring * rng.uniform(0.85, 1.15, k)
            pts = c + np.stack([rr * np.cos(t), rr * np.sin(t)], 1)
        else:
            pts = c + rng.normal(0, rng.uniform(0.02, 0.05), (k, 2)) * eye.u
        r = rng.uniform(0.004, 0.013, k) * eye.u
        if rng.random() < 0.3:  # a confluent plaque in the clump
            pts = np.vstack([pts, c])
            r = np.append(r, rng.uniform(0.015, 0.025) * eye.u)
        centres.append(pts)
        radii.append(r)
    if not centres:
        return np.zeros((0, 2)), np.zeros(0)
    return np.vstack(centres), np.concatenate(radii)


def _draw_blots(
    rng,
    mask,
    alpha,
    centres,
    radii,
    *,
    lobes=(1, 1),
    elong=(1.0, 1.0),
    angles=None,
    opacity=(0.85, 1.0),
):
    """Irregular blots: each is a union of ``lobes`` random ellipses around its centre."""
    for i, (c, r) in enumerate(zip(centres, radii)):
        n = int(rng.integers(lobes[0], lobes[1] + 1))
        a = float(rng.uniform(*opacity))
        for j in range(n):
            offset = rng.normal(0, 0.35, 2) * r if j else np.zeros(2)
            e = rng.uniform(*elong)
            axes = r * np.array([e, 1.0 / e]) * rng.uniform(0.6, 1.0, 2)
            ang = np.degrees(angles[i]) if angles is not None else rng.uniform(0, 180)
            _ellipse(mask, c + offset, axes, ang, 1)
            _ellipse(alpha, c + offset, axes, ang, a)


# --------------------------------------------------------------------------------------------
# The generator


def _pick_camera(rng, camera) -> Camera:
    choice = _CAMERA_NAMES[int(rng.integers(len(_CAMERA_NAMES)))]
    if camera is None:
        return CAMERAS[choice]
    if isinstance(camera, Camera):
        return camera
    if isinstance(camera, (int, np.integer)):
        return CAMERAS[_CAMERA_NAMES[int(camera) % len(_CAMERA_NAMES)]]
    if camera not in CAMERAS:
        raise ValueError(f"camera must be one of {sorted(CAMERAS)}, an int or None, got {camera!r}")
    return CAMERAS[camera]


def _noisy_grade(rng, grade: int, rate: float, top: int) -> int:
    """One step away from ``grade`` with probability ``rate`` (a draw is consumed always)."""
    flip, up = rng.random(), rng.random() < 0.5
    if flip >= rate:
        return grade
    if grade == 0 or (up and grade < top):
        return grade + 1
    return grade - 1


def generate(
    seed: int,
    *,
    size: int = 256,
    grade: Optional[int] = None,
    camera: Union[None, str, int, Camera] = None,
    label_noise: float = 0.0,
    eye: Optional[str] = None,
) -> SyntheticFundus:
    """Draw one synthetic colour fundus photograph with its lesion masks and labels.

    Args:
        seed: every random choice derives from it; the same seed gives the same eye at every size.
        size: image height in pixels; the width is ``round(size * camera.aspect)``.
        grade: target ICDRS grade 0-4 (``None``: uniform over 0-4). The returned ``true_grade``
            is recomputed from the lesions drawn (:func:`icdrs_grade`).
        camera: a name in ``CAMERAS``, an index, a ``Camera`` or ``None`` (chosen by the seed).
        label_noise: probability that the observed ``grade`` is one step off the true grade.
        eye: ``"left"``/``"right"`` or ``None`` (chosen by the seed); sets the disc side.

    Returns:
        A :class:`SyntheticFundus`.

    Example::

        >>> f = generate(0, size=64, grade=1, camera="square")
        >>> f.image.shape, f.masks[..., 0].any(), f.true_grade
        ((64, 64, 3), True, 1)
    """
    if int(size) < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if grade is not None and not 0 <= int(grade) < keys.NUM_GRADES:
        raise ValueError(f"grade must be None or in [0, {keys.NUM_GRADES - 1}], got {grade}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    if eye not in (None, "left", "right"):
        raise ValueError(f"eye must be 'left', 'right' or None, got {eye!r}")
    rng = np.random.default_rng(seed)
    cam = _pick_camera(rng, camera)
    target = int(rng.integers(keys.NUM_GRADES)) if grade is None else int(grade)
    eye_side = ("left", "right")[int(rng.integers(2))]
    eye_side = eye or eye_side
    h = int(size)
    w = int(round(h * cam.aspect))
    geo = _Eye(rng, cam, h, w, eye_side)
    u = geo.u

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist_c = np.hypot(xx - geo.centre[0], yy - geo.centre[1])

    # Retina reflectance: pigmentation, choroidal mottling, darker macula, foveal reflex.
    pigment = rng.uniform(0.0, 1.0)
    base = (1 - pigment) * np.array(_COLOURS["retina_light"]) + pigment * np.array(
        _COLOURS["retina_dark"]
    )
    texture = 1.0 + 0.07 * _smooth_noise(rng, 5, (h, w)) + 0.03 * _smooth_noise(rng, 18, (h, w))
    tint = 1.0 + 0.05 * _smooth_noise(rng, 4, (h, w))
    refl = np.empty((h, w, 3), np.float32)
    refl[..., 0] = base[0] * texture
    refl[..., 1] = base[1] * texture * tint
    refl[..., 2] = base[2] * texture * tint
    d_fov = np.hypot(xx - geo.fovea[0], yy - geo.fovea[1])
    macula = np.exp(-0.5 * (d_fov / (1.1 * geo.od_r)) ** 2)
    refl *= (1.0 - 0.38 * macula)[..., None] * np.array([1.0, 0.9, 0.85], np.float32)
    reflex = np.exp(-0.5 * (d_fov / max(0.008 * u, 0.4)) ** 2) * 0.25
    _blend(refl, reflex, (1.0, 0.8, 0.6))

    # Optic disc: soft-edged oval rim with a paler cup.
    dx, dy = (xx - geo.od[0]) / geo.od_axes[0], (yy - geo.od[1]) / geo.od_axes[1]
    rho = np.sqrt(dx * dx + dy * dy)
    edge = max(0.06, 0.8 / geo.od_r)
    disc_alpha = np.clip((1.0 - rho) / edge + 0.5, 0.0, 1.0)
    _blend(refl, disc_alpha * np.clip(1.05 - 0.3 * rho, 0, 1), _COLOURS["disc_rim"])
    cup = rng.uniform(0.35, 0.6)
    cup_off = rng.uniform(-0.15, 0.15, 2)
    rho_cup = np.hypot(dx - cup_off[0], dy - cup_off[1]) / cup
    _blend(refl, np.clip(1.2 - rho_cup, 0.0, 1.0) * 0.8, _COLOURS["disc_cup"])

    masks = np.zeros((h, w, keys.NUM_LESIONS), np.uint8)
    masks[..., OD] = rho <= 1.0

    # Vessels.
    veins, arteries = _vessel_tree(rng, geo)
    for kind, segments, opacity in (("vein", veins, 0.85), ("artery", arteries, 0.75)):
        canvas = np.zeros((h, w), np.float32)
        _draw_vessels(canvas, segments)
        _blend(refl, np.clip(canvas / 255.0, 0, 1) * opacity, _COLOURS[kind])

    # Lesions.
    plan = _lesion_plan(rng, target)
    lesion_alpha = {name: np.zeros((h, w), np.float32) for name in ("MA", "HE", "EX", "SE", "NV")}
    lesion_mask = {name: np.zeros((h, w), np.uint8) for name in ("MA", "HE", "EX", "SE")}

    ma_pts = _sample_positions(rng, geo, plan["MA"])
    ma_r = np.maximum(rng.uniform(0.005, 0.009, len(ma_pts)) * u, 0.5)
    _draw_blots(rng, lesion_mask["MA"], lesion_alpha["MA"], ma_pts, ma_r)

    if plan["HE_per_quadrant"]:
        he_pts = np.vstack(
            [_sample_in_quadrant(rng, geo, q, plan["HE_per_quadrant"]) for q in range(4)]
        )
    else:
        he_pts = _sample_positions(rng, geo, plan["HE"])
    he_r = rng.uniform(0.012, 0.035, len(he_pts)) * u
    flame = rng.random(len(he_pts)) < 0.35
    radial = np.arctan2(he_pts[:, 1] - geo.od[1], he_pts[:, 0] - geo.od[0]) if len(he_pts) else None
    for sel, lobes, elong in ((~flame, (2, 4), (1.0, 1.3)), (flame, (1, 2), (2.0, 3.0))):
        _draw_blots(
            rng,
            lesion_mask["HE"],
            lesion_alpha["HE"],
            he_pts[sel],
            he_r[sel],
            lobes=lobes,
            elong=elong,
            angles=None if radial is None else radial[sel],
        )

    ex_pts, ex_r = _exudate_clusters(rng, geo, plan["EX_clusters"])
    ok = geo.valid(ex_pts, margin=0.95) if len(ex_pts) else np.zeros(0, bool)
    ex_pts, ex_r = ex_pts[ok], ex_r[ok]
    _draw_blots(
        rng,
        lesion_mask["EX"],
        lesion_alpha["EX"],
        ex_pts,
        np.maximum(ex_r, 0.5),
        lobes=(1, 3),
        elong=(1.0, 1.6),
        opacity=(0.8, 1.0),
    )

    # Cotton-wool spots lie along the arcades, within a few disc diameters of the disc.
    se_pts = np.zeros((0, 2))
    if plan["SE"]:
        along = np.vstack([p for p, _ in veins[:4] + arteries[:4]])
        d_od = np.linalg.norm(along - geo.od, axis=1)
        near = along[(d_od > 2.0 * geo.od_r) & (d_od < 0.75 * u) & geo.valid(along)]
        if len(near):
            pick = near[rng.integers(len(near), size=plan["SE"])]
            se_pts = pick + rng.normal(0, 0.03, pick.shape) * u
            se_pts = se_pts[geo.valid(se_pts)]
    se_r = rng.uniform(0.025, 0.05, len(se_pts)) * u
    _draw_blots(
        rng,
        lesion_mask["SE"],
        lesion_alpha["SE"],
        se_pts,
        se_r,
        lobes=(2, 3),
        elong=(1.0, 1.5),
        opacity=(0.6, 0.85),
    )

    # New vessels on and next to the disc (NVD), sometimes also elsewhere (NVE).
    nv_loops = 0
    if plan["NV"]:
        nv_segments = []
        centres = [geo.od]
        if rng.random() < 0.5 and veins:
            centres.append(veins[0][0][len(veins[0][0]) // 2])
        for c in centres:
            for _ in range(plan["NV"]):
                start = c + rng.normal(0, 1.2, 2) * geo.od_r
                pts, _ = _walk(
                    rng,
                    start,
                    rng.uniform(0, 2 * np.pi),
                    int(rng.integers(8, 20)),
                    0.012 * u,
                    0.35,
                    0.45,
                    geo,
                    0.0,
                )
                if len(pts) >= 3:
                    nv_segments.append((pts, 0.0045 * u))
        nv_loops = len(nv_segments)
        canvas = np.zeros((h, w), np.float32)
        _draw_vessels(canvas, nv_segments, taper=0.0)
        lesion_alpha["NV"] = np.clip(canvas / 255.0, 0, 1) * 0.85

    blur = {"MA": 0.35, "HE": 0.12, "EX": 0.04, "SE": 0.45}
    radii = {"MA": ma_r, "HE": he_r, "EX": ex_r, "SE": se_r}
    for name in ("HE", "MA", "SE", "EX", "NV"):
        a = lesion_alpha[name]
        if name != "NV":
            r = float(np.mean(radii[name])) if len(radii[name]) else 1.0
            a = _blur(a, max(0.45, blur[name] * r))
        _blend(refl, np.clip(a, 0, 1), _COLOURS[name])

    # Camera: illumination, colour cast, tone curve, optics, flare, noise, FOV aperture.
    r_norm = dist_c / u
    grad = rng.normal(0, 0.12, 2)
    illum = (1.0 - cam.vignette * r_norm**3) * (
        1.0 + grad[0] * (xx - geo.centre[0]) / u + grad[1] * (yy - geo.centre[1]) / u
    )
    exposure = cam.exposure * rng.uniform(0.85, 1.15)
    gains = np.array(cam.gains) * rng.uniform(0.94, 1.06, 3)
    flare_on = rng.random() < cam.flare
    flare_angle = rng.uniform(0, 2 * np.pi)
    if flare_on:
        ang = np.arctan2(yy - geo.centre[1], xx - geo.centre[0])
        lobe = np.exp(-0.5 * ((np.angle(np.exp(1j * (ang - flare_angle)))) / 0.6) ** 2)
        illum = illum + 0.45 * lobe * np.exp(-0.5 * ((1.0 - r_norm) / 0.12) ** 2)
    img = refl * (np.clip(illum, 0.05, None) * exposure)[..., None] * gains.astype(np.float32)
    img = np.clip(img, 0, 1) ** (1.0 / cam.gamma)
    img = _blur(img, cam.blur * u)
    aperture = np.clip(u - dist_c + 0.5, 0.0, 1.0)
    noise_rng = np.random.default_rng([seed, h])  # resolution-dependent draws come last
    img = img * aperture[..., None]
    img += noise_rng.normal(0, cam.noise, img.shape).astype(np.float32) * (
        0.3 + 0.7 * aperture[..., None]
    )
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    inside = (aperture >= 0.5).astype(np.uint8)
    for name, idx in (("MA", MA), ("HE", HE), ("EX", EX), ("SE", SE)):
        masks[..., idx] = lesion_mask[name] * inside
    masks[..., OD] &= inside

    quadrants = geo.quadrant(he_pts) if len(he_pts) else np.zeros(0, int)
    he_q = tuple(int((quadrants == q).sum()) for q in range(4))
    counts = {
        "MA": len(ma_pts),
        "HE": len(he_pts),
        "EX": len(ex_pts),
        "SE": len(se_pts),
        "NV": nv_loops,
        "HE_quadrants": he_q,
    }
    true_grade = icdrs_grade(counts)
    ys, xs = np.nonzero(masks[..., EX])
    if len(ys) == 0:
        dme = 0
    else:
        near = np.hypot(xs - geo.fovea[0], ys - geo.fovea[1]).min() <= 2 * geo.od_r
        dme = 2 if near else 1
    observed = _noisy_grade(rng, true_grade, label_noise, keys.NUM_GRADES - 1)
    return SyntheticFundus(
        image=image,
        masks=masks,
        grade=observed,
        dme=dme,
        true_grade=true_grade,
        camera=cam.name,
        eye=eye_side,
        lesion_counts=counts,
        od_center=(float(geo.od[0]), float(geo.od[1])),
        od_radius=float(geo.od_r),
        fovea=(float(geo.fovea[0]), float(geo.fovea[1])),
    )


# --------------------------------------------------------------------------------------------
# On-disk layouts (docs/datasets.md)

LAYOUTS = ("idrid", "eyepacs", "ddr", "messidor", "messidor2")

DEFAULT_COUNTS: Dict[str, Dict[str, int]] = {
    "idrid": {"seg_train": 8, "seg_test": 4, "grading_train": 15, "grading_test": 10},
    "eyepacs": {"train": 20, "public": 10, "private": 10},
    "ddr": {
        "grading_train": 20,
        "grading_valid": 10,
        "grading_test": 10,
        "seg_train": 6,
        "seg_valid": 4,
        "seg_test": 4,
    },
    "messidor": {"Base11": 8, "Base21": 8, "Base31": 8},
    "messidor2": {"test": 20},
}

_IDRID_LESION_DIRS = (
    "1. Microaneurysms",
    "2. Haemorrhages",
    "3. Hard Exudates",
    "4. Soft Exudates",
    "5. Optic Disc",
)
_IDRID_SETS = {"train": "a. Training Set", "test": "b. Testing Set"}
_MESSIDOR_BASES = tuple(f"Base{a}{b}" for a in (1, 2, 3) for b in (1, 2, 3, 4))
_MESSIDOR_DEPARTMENTS = {
    "1": "Service Ophtalmologie Lariboisi\u00e8re",
    "2": "CHU de St Etienne",
    "3": "LaTIM - CHU de BREST",
}
_DDR_LESIONS = ("EX", "HE", "MA", "SE")
_DDR_UNGRADABLE = 5
_SEG_GRADES = (2, 3, 4, 3, 2, 1, 4, 3)  # segmentation sets are chosen among diseased eyes


def scaled_counts(layout: str, scale: float = 1.0) -> Dict[str, int]:
    """``DEFAULT_COUNTS[layout]`` multiplied by ``scale`` (at least one image per entry).

    Example::

        >>> scaled_counts("eyepacs", 2.0)
        {'train': 40, 'public': 20, 'private': 20}
    """
    if layout not in DEFAULT_COUNTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not scale > 0:
        raise ValueError(f"count scale must be > 0, got {scale}")
    return {k: max(1, int(round(v * scale))) for k, v in DEFAULT_COUNTS[layout].items()}


def _image_seed(seed: int, *parts: Union[str, int]) -> int:
    words = [int(seed)] + [
        p if isinstance(p, int) else int.from_bytes(p.encode(), "little") % (2**32) for p in parts
    ]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _balanced(rng, n: int, values: Sequence[int]) -> np.ndarray:
    """``n`` labels cycling through ``values`` in a seeded order: every value occurs once n
    reaches ``len(values)``."""
    return rng.permutation(np.resize(np.asarray(values), n))


def _save_jpeg(path: pathlib.Path, image: np.ndarray, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = cv2.imwrite(
        str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise OSError(f"could not write {path}")


def _save_idrid_mask(path: pathlib.Path, mask: np.ndarray) -> None:
    """A 1-bit palette TIFF like IDRiD's: PhotometricInterpretation 3, BitsPerSample 1,
    uncompressed, colormap index 0 black and index 1 red. Pillow then reads mode ``P`` with
    values {0, 1}, ``convert('L')`` gives {0, 76} and OpenCV grey {0, 76}, as on the real files.
    (The real files use 15 rows per strip; Pillow's writer only writes one strip.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[262] = 3  # PhotometricInterpretation: palette
    info[258] = (1,)  # BitsPerSample
    info[277] = 1  # SamplesPerPixel
    info[320] = (0, 65535, 0, 0, 0, 0)  # ColorMap: R(0, 1), G(0, 1), B(0, 1)
    Image.fromarray(mask.astype(bool)).save(path, tiffinfo=info, compression="raw")


def _save_grey_tiff(path: pathlib.Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L").save(path)


def _write_text(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def _ungradable(rng, image: np.ndarray) -> np.ndarray:
    """Spoil a photograph the way ungradable ones are: out of focus and badly exposed."""
    h = image.shape[0]
    spoilt = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.03 * h)
    gain = rng.choice([rng.uniform(0.12, 0.3), rng.uniform(1.8, 2.6)])
    return np.clip(spoilt * gain, 0, 255).astype(np.uint8)


def _write_idrid(root: pathlib.Path, counts, size, seed, label_noise) -> None:
    seg = root / "A. Segmentation"
    rng = np.random.default_rng(_image_seed(seed, "idrid"))
    first = 1
    for split in ("train", "test"):
        n = counts["seg_" + split]
        grades = _balanced(rng, n, _SEG_GRADES)
        for i in range(n):
            name = f"IDRiD_{first + i:02d}"
            f = generate(
                _image_seed(seed, "idrid-seg", first + i),
                size=size,
                grade=int(grades[i]),
                camera="kowa",
                label_noise=label_noise,
            )
            _save_jpeg(seg / "1. Original Images" / _IDRID_SETS[split] / f"{name}.jpg", f.image)
            gt = seg / "2. All Segmentation Groundtruths" / _IDRID_SETS[split]
            for k, lesion in enumerate(keys.LESIONS):
                folder = gt / _IDRID_LESION_DIRS[k]
                folder.mkdir(parents=True, exist_ok=True)
                if f.masks[..., k].any():  # as in IDRiD, an empty mask has no file
                    _save_idrid_mask(folder / f"{name}_{lesion}.tif", f.masks[..., k])
        first += n

    grading = root / "B. Disease Grading"
    for split, csv_name, n_cols in (
        ("train", "a. IDRiD_Disease Grading_Training Labels.csv", 12),
        ("test", "b. IDRiD_Disease Grading_Testing Labels.csv", 3),
    ):
        n = counts["grading_" + split]
        grades = _balanced(rng, n, range(keys.NUM_GRADES))
        header = ["Image name", "Retinopathy grade", "Risk of macular edema"]
        lines = [",".join(header + [""] * (n_cols - 3))]
        stray = min(int(n * 0.98), n - 2)  # IDRiD_405 of 413 ends with a blank
        for i in range(n):
            name = f"IDRiD_{i + 1:03d}"  # test names restart at IDRiD_001, as in IDRiD
            f = generate(
                _image_seed(seed, "idrid-grading-" + split, i),
                size=size,
                grade=int(grades[i]),
                camera="kowa",
                label_noise=label_noise,
            )
            _save_jpeg(grading / "1. Original Images" / _IDRID_SETS[split] / f"{name}.jpg", f.image)
            row = ",".join([name, str(f.grade), str(f.dme)] + [""] * (n_cols - 3))
            lines.append(row + (" " if i == stray and n_cols > 3 else ""))
        _write_text(grading / "2. Groundtruths" / csv_name, "\r\n".join(lines) + "\r\n")


def _write_eyepacs(root: pathlib.Path, counts, size, seed, label_noise) -> None:
    rng = np.random.default_rng(_image_seed(seed, "eyepacs"))
    patient = 10

    def names(n):
        nonlocal patient
        out = []
        while len(out) < n:
            out.extend([f"{patient}_left", f"{patient}_right"])
            patient += int(rng.integers(1, 6))
        return out[:n]

    def draw(part, i, name, grade):
        height = int(round(size * rng.uniform(0.8, 1.3)))
        f = generate(
            _image_seed(seed, "eyepacs-" + part, i),
            size=height,
            grade=int(grade),
            eye=name.rsplit("_", 1)[1],
            label_noise=label_noise,
        )
        return f

    n_train = counts["train"]
    train_names = names(n_train)
    lines = ["image,level"]
    for i, (name, grade) in enumerate(zip(train_names, _balanced(rng, n_train, range(5)))):
        f = draw("train", i, name, grade)
        image, level = f.image, f.grade
        if i == 1 and n_train >= 10:  # EyePACS has blank training images (every grey <= 22)
            image = rng.integers(0, 23, f.image.shape, dtype=np.uint8)
            level = 0
        _save_jpeg(root / "train" / f"{name}.jpeg", image, quality=90)
        lines.append(f"{name},{level}")
    _write_text(root / "trainLabels.csv", "\n".join(lines) + "\n")

    n_test = counts["public"] + counts["private"]
    usage = rng.permutation(["Public"] * counts["public"] + ["Private"] * counts["private"])
    lines = ["image,level,Usage"]
    test_names = names(n_test)
    for i, (name, grade) in enumerate(zip(test_names, _balanced(rng, n_test, range(5)))):
        f = draw("test", i, name, grade)
        _save_jpeg(root / "test" / f"{name}.jpeg", f.image, quality=90)
        lines.append(f"{name},{f.grade},{usage[i]}")
    _write_text(root / "retinopathy_solution.csv", "\n".join(lines) + "\n")


def _write_ddr(root: pathlib.Path, counts, size, seed, label_noise) -> None:
    rng = np.random.default_rng(_image_seed(seed, "ddr"))
    serial = 0

    def next_name():
        nonlocal serial
        serial += 1
        hospital = int(rng.integers(1, 148))
        return f"{hospital:03d}-{serial:04d}-{int(rng.integers(0, 400)):03d}"

    grading = root / "DR_grading"
    for split in ("train", "valid", "test"):
        n = counts["grading_" + split]
        grades = _balanced(rng, n, range(keys.NUM_GRADES))
        lines = []
        for i in range(n):
            name = next_name()
            height = int(round(size * rng.uniform(0.8, 1.3)))
            f = generate(
                _image_seed(seed, "ddr-grading-" + split, i),
                size=height,
                grade=int(grades[i]),
                label_noise=label_noise,
            )
            image, label = f.image, f.grade
            if i % 10 == 7:  # DDR labels ungradable photographs 5
                image, label = _ungradable(rng, image), _DDR_UNGRADABLE
            _save_jpeg(grading / split / f"{name}.jpg", image)
            lines.append(f"{name}.jpg {label}")
        _write_text(grading / f"{split}.txt", "\n".join(lines) + "\n")

    seg = root / "lesion_segmentation"
    for split in ("train", "valid", "test"):
        n = counts["seg_" + split]
        label_dir = "segmentation label" if split == "valid" else "label"
        grades = _balanced(rng, n, _SEG_GRADES)
        for i in range(n):
            name = next_name()
            f = generate(
                _image_seed(seed, "ddr-seg-" + split, i),
                size=size,
                grade=int(grades[i]),
                label_noise=label_noise,
            )
            _save_jpeg(seg / split / "image" / f"{name}.jpg", f.image)
            for lesion in _DDR_LESIONS:
                k = keys.LESIONS.index(lesion)
                _save_grey_tiff(seg / split / label_dir / lesion / f"{name}.tif", f.masks[..., k])


def _write_messidor(root: pathlib.Path, counts, size, seed, label_noise) -> None:
    try:
        import xlwt
    except ImportError as err:  # pragma: no cover - xlwt is a pinned dependency
        raise ImportError(
            "writing the Messidor layout needs xlwt (pip install 'xlwt>=1.3,<2')"
        ) from err
    rng = np.random.default_rng(_image_seed(seed, "messidor"))
    for base, n in counts.items():
        if base not in _MESSIDOR_BASES:
            raise ValueError(f"Messidor counts keys must be among {_MESSIDOR_BASES}, got {base!r}")
        folder = root / base
        folder.mkdir(parents=True, exist_ok=True)
        book = xlwt.Workbook(encoding="utf-8")
        sheet = book.add_sheet("Feuil1")
        header = [
            "Image name",
            "Ophthalmologic department",
            "Retinopathy grade",
            "Risk of macular edema ",  # trailing space, as in the copies seen
        ]
        for col, text in enumerate(header):
            sheet.write(0, col, text)
        day = datetime.date(2005, 1, 10) + datetime.timedelta(
            120 * int(base[-2]) + 9 * int(base[-1])
        )
        date = day.strftime("%Y%m%d")
        serial = int(rng.integers(10000, 60000))
        grades = _balanced(rng, n, range(keys.NUM_GRADES))
        for i in range(n):
            name = f"{date}_{serial + i:05d}_0100_PP.tif"
            image_seed = _image_seed(seed, base, i)
            f = generate(image_seed, size=size, grade=int(grades[i]), camera="topcon")
            noise_rng = np.random.default_rng([image_seed, 1])
            grade = _noisy_grade(noise_rng, messidor_grade(f.lesion_counts), label_noise, 3)
            Image.fromarray(f.image).save(folder / name)
            row = [name, _MESSIDOR_DEPARTMENTS[base[-2]], grade, f.dme]
            for col, value in enumerate(row):
                sheet.write(i + 1, col, value)
        book.save(str(folder / f"Annotation_{base}.xls"))


def _write_messidor2(root: pathlib.Path, counts, size, seed, label_noise) -> None:
    """Messidor-2: ``IMAGES/*.png`` and the adjudicated grades of ``messidor_data.csv``
    (``image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable``; ICDRS 0-4, as
    the other ICDRS layouts grade them). The last image of 10 or more is ungradable, as four
    of the real set are (its row says so and the converter skips it)."""
    rng = np.random.default_rng(_image_seed(seed, "messidor2"))
    n = counts["test"]
    serial = int(rng.integers(10000, 60000))
    images = root / "IMAGES"
    images.mkdir(parents=True, exist_ok=True)
    lines = ["image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable"]
    for i, grade in enumerate(_balanced(rng, n, range(keys.NUM_GRADES))):
        name = f"20060523_{serial + i:05d}_0100_PP.png"
        f = generate(
            _image_seed(seed, "messidor2", i),
            size=size,
            grade=int(grade),
            camera="topcon",
            label_noise=label_noise,
        )
        Image.fromarray(f.image).save(images / name)
        gradable = 0 if n >= 10 and i == n - 1 else 1
        lines.append(f"{name},{f.grade},{int(f.dme > 0)},{gradable}")
    _write_text(root / "messidor_data.csv", "\n".join(lines) + "\n")


_WRITERS = {
    "idrid": _write_idrid,
    "eyepacs": _write_eyepacs,
    "ddr": _write_ddr,
    "messidor": _write_messidor,
    "messidor2": _write_messidor2,
}


def write_layout(
    out_dir: Union[str, os.PathLike],
    layout: str,
    *,
    counts: Optional[Mapping[str, int]] = None,
    size: int = 256,
    seed: int = 0,
    label_noise: float = 0.0,
) -> pathlib.Path:
    """Write synthetic photographs and labels in the real on-disk layout of a public dataset.

    ``out_dir`` becomes the dataset root that ``python -m data_prep <layout> --src`` reads:

    - ``idrid``: ``A. Segmentation/`` (JPEGs ``IDRiD_NN.jpg``; 1-bit palette TIFF masks in the
      five lesion folders, no file for an empty mask, so soft exudates exist for some images
      only; test numbers continue after training ones) and ``B. Disease Grading/`` (JPEGs
      ``IDRiD_NNN.jpg``, test names restarting at ``IDRiD_001``; the training CSV with 12
      columns, CRLF and one stray trailing blank; the 3-column test CSV).
    - ``eyepacs``: ``train/<patient>_<left|right>.jpeg``, ``trainLabels.csv`` (``image,level``;
      one blank training image, as in EyePACS), ``test/`` and ``retinopathy_solution.csv``
      (``image,level,Usage`` with Public/Private); sizes vary per image.
    - ``ddr``: ``DR_grading/{train,valid,test}/*.jpg`` with ``DR_grading/{split}.txt`` lines
      ``name.jpg grade`` (grade 5 for spoilt, ungradable photographs) and
      ``lesion_segmentation/{split}/image/*.jpg`` with single-channel 0/255 TIFF masks in
      ``label/{EX,HE,MA,SE}/`` (``segmentation label/`` for ``valid``).
    - ``messidor``: ``BaseXY/`` folders of TIFF images and ``Annotation_BaseXY.xls`` (sheet
      ``Feuil1``; Messidor 0-3 grade from :func:`messidor_grade`, macular-oedema risk 0-2).
    - ``messidor2``: ``IMAGES/*.png`` and ``messidor_data.csv`` (adjudicated ICDRS grade, DME
      0/1, gradable 0/1; one ungradable image when there are 10 or more).

    Args:
        out_dir: dataset root to create.
        layout: one of ``LAYOUTS``.
        counts: images per part; keys as in ``DEFAULT_COUNTS[layout]`` (missing keys keep their
            defaults; for Messidor the keys are the bases to write).
        size: image height in pixels (EyePACS and DDR grading images vary around it).
        seed: seed of the whole layout; the same seed writes the same files.
        label_noise: grader label-noise rate (:func:`generate`).

    Returns:
        ``out_dir`` as a ``pathlib.Path``.

    Example::

        >>> root = write_layout("/tmp/raw/ddr", "ddr", counts={"grading_train": 5}, size=64)
        ... # doctest: +SKIP
    """
    if layout not in _WRITERS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    merged = dict(DEFAULT_COUNTS[layout]) if layout != "messidor" or counts is None else {}
    if counts:
        unknown = set(counts) - set(DEFAULT_COUNTS[layout]) if layout != "messidor" else set()
        if unknown:
            raise ValueError(
                f"unknown count keys {sorted(unknown)} for layout {layout!r}; expected "
                f"{sorted(DEFAULT_COUNTS[layout])}"
            )
        merged.update({k: int(v) for k, v in counts.items()})
    if any(v < 0 for v in merged.values()):
        raise ValueError(f"counts must be >= 0, got {merged}")
    root = pathlib.Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _WRITERS[layout](root, merged, int(size), int(seed), float(label_noise))
    return root
