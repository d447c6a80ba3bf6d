"""Synthetic, fully fake DICOM cohorts for development and tests.

``synthesize_cohort`` writes chest-radiograph-like DX studies (a PA and a lateral series per
study) or small chest CT volumes, from three fake "sites" that differ the way real sites do:
vendor tags, pixel spacing and matrix size, stored intensity scale, noise, photometric
interpretation and transfer syntax. Every identifying attribute carries an obviously fake,
searchable value ("Fake...", "FAKEID-...", "FAKEACC-...").

Layout::

    out/labels.csv                       StudyInstanceUID,label (one row per study)
    out/findings.json                    where the finding is, keyed by UID (see below)
    out/p0001/s01/se1/0001.dcm           patient / study / series / instance

``findings.json`` maps

* each DX image with a finding (``nodule`` or ``effusion``) by its SOPInstanceUID to
  ``{"level": "image", "label", "view", "study_instance_uid", "series_instance_uid", "rows",
  "columns", ...}`` plus, for a nodule, ``center_row``, ``center_col``, ``radius_px`` and, for an
  effusion, ``row_min``/``row_max`` (the affected rows) and ``sides`` (per side: ``side`` as the
  patient's "R"/"L" or "posterior" for the lateral view, with the affected row and column range);
* each CT series with a lesion by its SeriesInstanceUID to ``{"level": "series", "label":
  "lesion", "center_zyx", "radius_vox", "sop_instance_uids"}`` where ``z`` is the index into
  ``sop_instance_uids`` (InstanceNumber - 1).

``degrade_site`` (a site's name, e.g. ``"site3"``, or its institution name) makes that one
site's images worse on purpose, for testing that a report notices: contrast squeezed towards
the image mean and strong extra noise, from a generator of its own per image, so the rest of
the cohort is byte-identical to the cohort without the option.

The same ``(n_studies, seed, modality, image_size)`` gives byte-identical files: all randomness
comes from ``numpy.random.default_rng(seed)``, UIDs from :func:`pydicom.uid.generate_uid` with a
deterministic entropy source, dates from the generator (never the clock).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

from workbench.errors import UsageError

__all__ = [
    "CT_CLASSES",
    "DX_CLASSES",
    "SITES",
    "SiteProfile",
    "SynthSummary",
    "synthesize_cohort",
]

DX_CLASSES = ("normal", "nodule", "effusion")
MULTI_LABEL = "effusion;nodule"  # a study with both findings (``multilabel=True``)
CT_CLASSES = ("no_lesion", "lesion")
# The demo cohort (`workbench demo`, and the app's browser test): studies, seed, image size.
DEMO_STUDIES, DEMO_SEED, DEMO_IMAGE_SIZE = 300, 0, 256

CT_SLICES = 32


@dataclass(frozen=True)
class SiteProfile:
    """How one fake site acquires and stores images.

    DX stored values: the display value p in [0, 1] maps linearly to stored ``stored_low`` (p=0)
    .. ``stored_high`` (p=1) for MONOCHROME2, and the other way round for MONOCHROME1; the
    window written to the file covers exactly that range after the rescale, so every site
    looks alike after the display pipeline.
    """

    name: str
    institution: str
    manufacturer: str
    model: str
    station: str
    size_factor: float  # DX matrix size relative to image_size
    dx_field_of_view_mm: float
    ct_field_of_view_mm: float
    rescale_slope: float
    rescale_intercept: float
    bits_stored: int
    stored_low: int
    stored_high: int
    noise_sigma: float  # DX, in display units
    ct_noise_hu: float
    photometric: str  # DX; CT is always MONOCHROME2
    transfer_syntax: str

    def dx_size(self, image_size: int) -> int:
        return int(2 * round(image_size * self.size_factor / 2))

    @property
    def modality_range(self) -> tuple[float, float]:
        lo = self.stored_low * self.rescale_slope + self.rescale_intercept
        hi = self.stored_high * self.rescale_slope + self.rescale_intercept
        return lo, hi


SITES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="site1",
        institution="Fake Northfield General Hospital",
        manufacturer="Acme Medical",
        model="Acme DR-500",
        station="NFG-DX01",
        size_factor=1.0,
        dx_field_of_view_mm=430.0,
        ct_field_of_view_mm=340.0,
        rescale_slope=1.0,
        rescale_intercept=0.0,
        bits_stored=12,
        stored_low=100,
        stored_high=3995,
        noise_sigma=0.012,
        ct_noise_hu=10.0,
        photometric="MONOCHROME2",
        transfer_syntax=ExplicitVRLittleEndian,
    ),
    SiteProfile(
        name="site2",
        institution="Fake Riverside Clinic",
        manufacturer="Borealis Imaging",
        model="Borealis XR-2",
        station="RSC-XR2",
        size_factor=240 / 256,
        dx_field_of_view_mm=410.0,
        ct_field_of_view_mm=360.0,
        rescale_slope=0.5,
        rescale_intercept=-200.0,
        bits_stored=12,
        stored_low=400,
        stored_high=3800,
        noise_sigma=0.02,
        ct_noise_hu=18.0,
        photometric="MONOCHROME1",
        transfer_syntax=RLELossless,
    ),
    SiteProfile(
        name="site3",
        institution="Fake Lakeshore University Medical Center",
        manufacturer="Cobalt Systems",
        model="Cobalt Vision 3",
        station="LUMC-RAD3",
        size_factor=272 / 256,
        dx_field_of_view_mm=440.0,
        ct_field_of_view_mm=380.0,
        rescale_slope=2.0,
        rescale_intercept=-1024.0,
        bits_stored=12,
        stored_low=600,
        stored_high=2600,
        noise_sigma=0.016,
        ct_noise_hu=14.0,
        photometric="MONOCHROME2",
        transfer_syntax=JPEGLSLossless,
    ),
)


@dataclass(frozen=True)
class SynthSummary:
    out: Path
    labels_csv: Path
    n_patients: int
    n_studies: int
    n_files: int
    class_counts: dict[str, int]


# --------------------------------------------------------------------------------------------
# Fake identities
# --------------------------------------------------------------------------------------------

_SURNAMES = (
    "Abbott", "Baker", "Carver", "Dalton", "Ellison", "Fletcher", "Garner", "Harper", "Ingram",
    "Jarvis", "Keller", "Lowell", "Mercer", "Norris", "Oakley", "Porter", "Quill", "Rowan",
    "Sawyer", "Thorne", "Upton", "Vance", "Walker", "Yates", "Zimmer", "Ashby", "Blake",
    "Colby", "Drake", "Emery", "Finch", "Gale", "Hollis", "Irwin", "Judd", "Kent", "Lyle",
    "Marsh", "Nash", "Orton", "Pike", "Reed", "Shaw", "Tate", "Vale", "Wren", "York",
)  # fmt: skip
_GIVEN_F = (
    "Alice", "Beatrix", "Clara", "Dora", "Edith", "Fiona", "Greta", "Helen", "Iris", "Julia",
    "Kara", "Lena", "Maya", "Nora", "Olive", "Paula", "Rosa", "Sofia", "Tessa", "Vera",
)  # fmt: skip
_GIVEN_M = (
    "Adam", "Bruno", "Carl", "Derek", "Emil", "Felix", "Gavin", "Hugo", "Ivan", "Jonas",
    "Karl", "Leon", "Marco", "Nils", "Oscar", "Paul", "Rolf", "Simon", "Tomas", "Victor",
)  # fmt: skip
_DOCTORS = ("Fakedoc^Gregory", "Fakedoc^Meredith", "Fakedoc^Lisa", "Fakedoc^James")


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates (yy, xx) in (0, 1), float32, cached per size."""
    c = ((np.arange(n, dtype=np.float32) + 0.5) / n).astype(np.float32)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _smooth(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _ellipse(
    yy: np.ndarray,
    xx: np.ndarray,
    cy: float,
    cx: float,
    ay: float | np.ndarray,
    ax: float | np.ndarray,
    edge: float = 0.06,
) -> np.ndarray:
    """Soft elliptic mask: 1 inside, 0 outside, ``edge`` wide (as a fraction of the radius)."""
    r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    return _smooth((1.0 - r) / edge)


def _texture(rng: np.random.Generator, n: int, cells: int = 12) -> np.ndarray:
    """Smooth random field of unit-ish amplitude (lung markings, mottle)."""
    low = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(ndimage.zoom(low, n / cells, order=3, grid_mode=True, mode="reflect"))[:n, :n]


@dataclass(frozen=True)
class _Anatomy:
    """Per-patient body habitus, shared by all of a patient's images (jittered per study)."""

    body_width: float
    lung_height: float
    heart_size: float
    depth: float


def _anatomy(rng: np.random.Generator) -> _Anatomy:
    return _Anatomy(
        body_width=float(rng.uniform(0.9, 1.06)),
        lung_height=float(rng.uniform(0.9, 1.08)),
        heart_size=float(rng.uniform(0.88, 1.15)),
        depth=float(rng.uniform(0.9, 1.08)),
    )


def _rows_where(mask: np.ndarray) -> tuple[int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    return (int(rows[0]), int(rows[-1])) if rows.size else None


def _cols_where(mask: np.ndarray) -> tuple[int, int] | None:
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]), int(cols[-1])) if cols.size else None


@dataclass(frozen=True)
class _Lung:
    """A lung field: rounded apex, near-vertical walls, a diaphragm dome below.

    ``u`` runs from -1 (medial, or anterior on the lateral view) to +1 (lateral, or posterior),
    ``w`` from -1 (apex) to +1 (deepest point of the costophrenic angle).
    """

    cy: float
    cx: float
    ay: float
    ax: float
    outward: float  # +1 when the lateral (posterior) wall is towards larger x
    dome: float  # how far the diaphragm dome rises above the costophrenic angle (w units)

    def coords(self, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = (yy - self.cy) / self.ay
        widen = 1.0 + 0.12 * np.clip(w, 0.0, 1.0)  # walls splay a little towards the base
        u = (xx - self.cx) / (self.ax * widen) * self.outward
        return u, w

    def mask(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        u, w = self.coords(yy, xx)
        r = np.sqrt(u * u + np.minimum(w, 0.0) ** 2)
        diaphragm = 1.0 - self.dome * (1.0 - ((u + 1.0) / 2.0) ** 2)
        return _smooth((1.0 - r) / 0.07) * _smooth((diaphragm - w) / 0.035)

    def fluid(self, yy: np.ndarray, xx: np.ndarray, fraction: float) -> np.ndarray:
        """Fluid in the base with a meniscus rising towards the lateral (posterior) wall."""
        u, w = self.coords(yy, xx)
        level = 1.0 - 2.0 * fraction * (0.3 + 0.7 * ((np.clip(u, -1.0, 1.0) + 1.0) / 2.0) ** 2)
        return _smooth((w - level) / 0.06)

    def point(self, u: float, w: float) -> tuple[float, float]:
        """Normalised (y, x) of lung coordinates (u, w)."""
        widen = 1.0 + 0.12 * min(max(w, 0.0), 1.0)
        return self.cy + w * self.ay, self.cx + u * self.ax * widen * self.outward


def _nodule_profile(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r)
    return np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))


def _ribs(yy: np.ndarray, xx: np.ndarray, top: float, spacing: float, count: int) -> np.ndarray:
    """Curved, periodic rib bands (vectorised over all ribs at once)."""
    lateral = np.abs(xx - 0.5) / 0.35
    t = (yy - top - 0.05 * lateral - 0.05 * lateral**2) / spacing
    frac = t - np.floor(t)
    band = np.exp(-(((frac - 0.5) * spacing / 0.011) ** 2))
    return np.where((t >= 0) & (t < count), band, 0.0).astype(np.float32)


def _band(xx: np.ndarray, centre: float, half_width: float) -> np.ndarray:
    return _smooth(1.0 - np.abs(xx - centre) / half_width)


def _draw_dx(
    rng: np.random.Generator,
    n: int,
    anatomy: _Anatomy,
    label: str,
    view: str,
    finding: dict[str, Any],
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Display-space image p in about [0, 1] (bright = dense) and the finding's location.

    ``finding`` carries what both views of a study share (nodule height, effusion sides).
    """
    yy, xx = _grid(n)
    bw = anatomy.body_width * rng.uniform(0.98, 1.02)
    lh = anatomy.lung_height * rng.uniform(0.98, 1.02)
    hs = anatomy.heart_size * rng.uniform(0.97, 1.03)
    bones: np.ndarray
    if view == "PA":
        body = _ellipse(yy, xx, 0.68, 0.5, 0.8, 0.46 * bw, 0.04)
        bones = 0.13 * _band(xx, 0.5, 0.04)  # spine
        lungs = [
            _Lung(0.45, 0.5 - 0.17 * bw, 0.3 * lh, 0.125 * bw, -1.0, 0.3),  # patient's right
            _Lung(0.45, 0.5 + 0.17 * bw, 0.3 * lh, 0.12 * bw, 1.0, 0.24),
        ]
        heart = _ellipse(yy, xx, 0.67, 0.535, 0.13 * hs, 0.145 * hs, 0.12)
        ribs = _ribs(yy, xx, 0.17, 0.056 * lh, 9)
        for side in (-1.0, 1.0):  # clavicles
            x0, y0, x1, y1 = 0.5 + side * 0.05, 0.17, 0.5 + side * 0.33, 0.11
            vx, vy = x1 - x0, y1 - y0
            t = np.clip(((xx - x0) * vx + (yy - y0) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
            dist = np.hypot(xx - (x0 + t * vx), yy - (y0 + t * vy))
            bones = bones + 0.1 * np.exp(-((dist / 0.012) ** 2))
        hila = sum(
            (_ellipse(yy, xx, 0.46, 0.5 + s * 0.085 * bw, 0.05, 0.035, 0.6) for s in (-1.0, 1.0)),
            np.zeros_like(yy),
        )
    else:  # lateral: anterior on the image left, spine (posterior) on the right
        depth = anatomy.depth
        body = _ellipse(yy, xx, 0.68, 0.49, 0.8, 0.37 * depth, 0.04)
        vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * yy / 0.055)
        bones = (0.1 + 0.06 * vertebrae) * _band(xx, 0.49 + 0.27 * depth, 0.05)
        bones = bones + 0.06 * _band(xx, 0.49 - 0.33 * depth, 0.02)  # sternum
        lungs = [_Lung(0.45, 0.5, 0.3 * lh, 0.23 * depth, 1.0, 0.35)]
        heart = _ellipse(yy, xx, 0.66, 0.39, 0.14 * hs, 0.15 * hs, 0.12)
        ribs = 0.5 * _ribs(yy, xx, 0.17, 0.056 * lh, 9)
        hila = _ellipse(yy, xx, 0.46, 0.53, 0.06, 0.05, 0.6)

    lung_masks = [lg.mask(yy, xx) for lg in lungs]
    lung = np.maximum.reduce(lung_masks) if len(lung_masks) > 1 else lung_masks[0]
    fluid = np.zeros_like(lung)
    located: dict[str, Any] | None = None
    found = set(label.split(";"))
    if "effusion" in found:
        sides: list[dict[str, Any]] = []
        targets = finding["sides"] if view == "PA" else [0]
        for i in targets:
            region = lungs[i].fluid(yy, xx, finding["fraction"]) * lung_masks[i]
            fluid = np.maximum(fluid, region)
            affected = region > 0.5
            rows, cols = _rows_where(affected), _cols_where(affected)
            if rows is not None and cols is not None:
                side_name = ("R" if i == 0 else "L") if view == "PA" else "posterior"
                sides.append(
                    {
                        "side": side_name,
                        "row_min": rows[0],
                        "row_max": rows[1],
                        "col_min": cols[0],
                        "col_max": cols[1],
                    }
                )
        total = _rows_where(fluid > 0.5)
        located = {
            "row_min": total[0] if total else None,
            "row_max": total[1] if total else None,
            "sides": sides,
        }

    markings = _texture(rng, n, 14) * 0.03 + _texture(rng, n, 40) * 0.012
    air = lung * (1.0 - heart) * (1.0 - fluid)  # aerated lung
    img = 0.03 + 0.47 * body + (bones + 0.03 * ribs) * body + 0.04 * heart * body
    img += -0.3 * air + 0.09 * ribs * lung + (markings + 0.07 * hila) * air

    if "nodule" in found:
        effusion = located
        r = finding["radius"]
        lg = lungs[finding["side"]] if view == "PA" else lungs[0]
        cy, cx = lg.point(finding["u"] if view == "PA" else finding["u_lat"], finding["w"])
        img += finding["amplitude"] * _nodule_profile(yy, xx, cy, cx, r)
        located = {
            "center_row": round(float(cy * n - 0.5), 2),
            "center_col": round(float(cx * n - 0.5), 2),
            "radius_px": round(float(r * n), 2),
        }
        if effusion is not None:  # both findings: each located under its name
            located = {"nodule": located, "effusion": effusion}

    # exposure / processing differences between images
    img = img * rng.uniform(0.92, 1.08) + rng.uniform(-0.03, 0.03)
    return img.astype(np.float32), located


def _dx_finding(rng: np.random.Generator, label: str) -> dict[str, Any]:
    """What both views of one study share about its finding (both findings: ``a;b``)."""
    if ";" in label:
        out: dict[str, Any] = {}
        for part in sorted(label.split(";")):  # distinct keys per finding: merged safely
            out.update(_dx_finding(rng, part))
        return out
    if label == "nodule":
        # a point well inside the aerated lung, above the heart; height shared by both views
        return {
            "side": int(rng.integers(2)),
            "w": float(rng.uniform(-0.55, 0.25)),
            "u": float(rng.uniform(-0.35, 0.55)),
            "u_lat": float(rng.uniform(-0.2, 0.6)),
            # Conspicuity varies as in real cohorts: some nodules are small and faint.
            "radius": float(rng.uniform(0.022, 0.05)),
            "amplitude": float(rng.uniform(0.07, 0.3)),
        }
    if label == "effusion":
        which = int(rng.integers(3))
        return {
            "sides": [0, 1] if which == 2 else [which],
            "fraction": float(rng.uniform(0.1, 0.42)),  # from a trace to a large effusion
        }
    return {}


# A degraded site: display contrast kept at this fraction and this much Gaussian noise added
# (display units, before the site's own noise) - enough that faint findings disappear.
DEGRADE_CONTRAST = 0.15
DEGRADE_NOISE = 0.3
DEGRADE_CT_NOISE_HU = 200.0


def _degrade(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Low contrast and heavy noise: the image of a failing detector or a bad protocol."""
    mean = float(p.mean())
    p = mean + DEGRADE_CONTRAST * (p - mean)
    p = p + rng.standard_normal(p.shape).astype(np.float32) * DEGRADE_NOISE
    return np.clip(p, 0.0, 1.0).astype(np.float32)


def _to_stored(p: np.ndarray, site: SiteProfile, rng: np.random.Generator) -> np.ndarray:
    p = p + rng.standard_normal(p.shape, dtype=np.float32) * site.noise_sigma
    if site.photometric == "MONOCHROME1":
        p = 1.0 - p
    stored = site.stored_low + p * (site.stored_high - site.stored_low)
    return np.clip(np.rint(stored), 0, 2**site.bits_stored - 1).astype(np.uint16)


def _draw_ct(
    rng: np.random.Generator, n: int, anatomy: _Anatomy, label: str, site: SiteProfile
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """A (32, n, n) uint16 volume of stored values (HU + 1024) and the lesion location."""
    yy, xx = _grid(n)
    y3, x3 = yy[None], xx[None]
    z = ((np.arange(CT_SLICES, dtype=np.float32) + 0.5) / CT_SLICES)[:, None, None]
    bw = anatomy.body_width
    body = _ellipse(y3, x3, 0.52, 0.5, 0.32 * anatomy.depth, 0.43 * bw, 0.03)
    inner = _ellipse(y3, x3, 0.52, 0.5, 0.29 * anatomy.depth, 0.40 * bw, 0.05)
    hu = -1000.0 + 1040.0 * body - 140.0 * (body - inner)  # air, soft tissue, fat ring
    taper = np.sqrt(np.clip(1.0 - ((z - 0.42) / 0.85) ** 2, 0.05, 1.0))
    lungs: np.ndarray = np.zeros((CT_SLICES, n, n), dtype=np.float32)
    for side in (-1.0, 1.0):
        lungs = np.maximum(
            lungs, _ellipse(y3, x3, 0.5, 0.5 + side * 0.19 * bw, 0.21 * taper, 0.145 * bw * taper)
        )
    heart = _ellipse(y3, x3, 0.42, 0.53, 0.12 * anatomy.heart_size, 0.12 * anatomy.heart_size)
    lungs = lungs * (1.0 - heart)
    texture = _texture(rng, n, 16)[None] * 25.0
    hu = hu + lungs * (-890.0 + texture)
    hu += 10.0 * heart
    spine = _ellipse(y3, x3, 0.77, 0.5, 0.05, 0.05, 0.2)
    hu += 650.0 * spine
    aorta = _ellipse(y3, x3, 0.66, 0.57, 0.03, 0.03, 0.3)
    hu += 15.0 * aorta

    located: dict[str, Any] | None = None
    if label == "lesion":
        r = float(rng.uniform(4.0, 8.0))
        side = -1.0 if rng.integers(2) == 0 else 1.0
        cz = float(rng.uniform(r + 1.0, CT_SLICES - r - 2.0))
        cy = float((0.5 + rng.uniform(-0.08, 0.08)) * n)
        cx = float((0.5 + side * 0.19 * bw + rng.uniform(-0.05, 0.05)) * n)
        zi = np.arange(CT_SLICES, dtype=np.float32)[:, None, None]
        yi = np.arange(n, dtype=np.float32)[None, :, None]
        xi = np.arange(n, dtype=np.float32)[None, None, :]
        dist = np.sqrt((zi - cz) ** 2 + (yi - cy) ** 2 + (xi - cx) ** 2)
        sphere = _smooth((r - dist) / 1.5 + 0.5)
        hu = hu * (1.0 - sphere) + 90.0 * sphere
        located = {
            "center_zyx": [round(cz, 2), round(cy, 2), round(cx, 2)],
            "radius_vox": round(r, 2),
        }
    hu = hu + rng.standard_normal(hu.shape, dtype=np.float32) * site.ct_noise_hu
    stored = np.clip(np.rint(hu + 1024.0), 0, 2**site.bits_stored - 1).astype(np.uint16)
    return stored, located


# --------------------------------------------------------------------------------------------
# Cohort plan
# --------------------------------------------------------------------------------------------


def _label_list(
    rng: np.random.Generator, n: int, modality: str, multilabel: bool = False
) -> list[str]:
    if modality == "DX":
        n_nod = max(1, round(n / 4)) if n >= 2 else 0
        n_eff = max(1, round(n / 4)) if n >= 3 else 0
        labels = ["nodule"] * n_nod + ["effusion"] * n_eff
        if multilabel and n >= 4:  # about one study in six shows both findings
            labels += [MULTI_LABEL] * max(1, round(n / 6))
        labels += ["normal"] * (n - len(labels))
    else:
        n_les = max(1, n // 2) if n >= 2 else 0
        labels = ["lesion"] * n_les + ["no_lesion"] * (n - n_les)
    return [labels[i] for i in rng.permutation(n)]


def _age_on(birth: dt.date, day: dt.date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


@dataclass(frozen=True)
class _Study:
    patient: int  # 1-based
    index: int  # 1-based within the patient
    label: str
    date: dt.date
    time: str
    number: int  # 1-based over the cohort


@dataclass(frozen=True)
class _Patient:
    number: int
    site: SiteProfile
    sex: str
    name: str
    birth: dt.date
    anatomy: _Anatomy
    doctor: str


def _plan(
    rng: np.random.Generator, n_studies: int, modality: str, multilabel: bool = False
) -> tuple[list[_Patient], list[_Study]]:
    n_two = max(1, round(n_studies / 5)) if n_studies >= 2 else 0
    n_patients = n_studies - n_two
    counts = [2] * n_two + [1] * (n_patients - n_two)
    counts = [counts[i] for i in rng.permutation(n_patients)]
    sites = [i % len(SITES) for i in range(n_patients)]
    sites = [sites[i] for i in rng.permutation(n_patients)]
    labels = _label_list(rng, n_studies, modality, multilabel)

    patients: list[_Patient] = []
    studies: list[_Study] = []
    for p in range(n_patients):
        sex = "F" if rng.integers(2) == 0 else "M"
        given = (_GIVEN_F if sex == "F" else _GIVEN_M)[int(rng.integers(20))]
        surname = _SURNAMES[(p * 7 + int(rng.integers(len(_SURNAMES)))) % len(_SURNAMES)]
        first = dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(0, 4 * 365)))
        age = int(rng.integers(25, 86))
        birth = dt.date(first.year - age, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
        if _age_on(birth, first) != age:  # birthday later in the year than the study
            birth = dt.date(birth.year - 1, birth.month, min(birth.day, 28))
        patients.append(
            _Patient(
                number=p + 1,
                site=SITES[sites[p]],
                sex=sex,
                name=f"Fake{surname}^{given}",
                birth=birth,
                anatomy=_anatomy(rng),
                doctor=_DOCTORS[int(rng.integers(len(_DOCTORS)))],
            )
        )
        day = first
        for k in range(counts[p]):
            if k:
                day = day + dt.timedelta(days=int(rng.integers(60, 900)))
            hh, mm, ss = int(rng.integers(7, 19)), int(rng.integers(60)), int(rng.integers(60))
            studies.append(
                _Study(
                    patient=p + 1,
                    index=k + 1,
                    label=labels[len(studies)],
                    date=day,
                    time=f"{hh:02d}{mm:02d}{ss:02d}",
                    number=len(studies) + 1,
                )
            )
    return patients, studies


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _ds_str(value: float) -> str:
    """A DS value that is short and exact enough (<= 16 characters)."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"


def _base_dataset(
    patient: _Patient, study: _Study, uid: Any, modality: str, sop_class: str
) -> Dataset:
    site = patient.site
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = study.date.strftime("%Y%m%d")
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.StudyTime = study.time
    ds.SeriesTime = study.time
    ds.ContentTime = study.time
    ds.AccessionNumber = f"FAKEACC-{study.number:07d}"
    ds.Modality = modality
    ds.Manufacturer = site.manufacturer
    ds.InstitutionName = site.institution
    ds.ReferringPhysicianName = patient.doctor
    ds.StationName = site.station
    ds.StudyDescription = "XR CHEST PA AND LATERAL" if modality == "DX" else "CT CHEST"
    ds.ManufacturerModelName = site.model
    ds.PatientName = patient.name
    ds.PatientID = f"FAKEID-{patient.number:06d}"
    ds.PatientBirthDate = patient.birth.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{_age_on(patient.birth, study.date):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = uid("study", study.number)
    ds.StudyID = f"{study.number}"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.BitsStored = site.bits_stored
    ds.HighBit = site.bits_stored - 1
    ds.PixelRepresentation = 0
    return ds


def _write(ds: Dataset, stored: np.ndarray, transfer_syntax: str, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.PixelData = stored.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    tsuid = UID(transfer_syntax)
    if tsuid != ExplicitVRLittleEndian:
        plugin = "pylibjpeg" if tsuid == RLELossless and _has_plugin(tsuid, "pylibjpeg") else ""
        ds.compress(tsuid, stored, encoding_plugin=plugin, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@lru_cache(maxsize=8)
def _has_plugin(tsuid: UID, plugin: str) -> bool:
    return plugin in get_encoder(tsuid)._available


def _dx_study_files(
    out: Path,
    rng: np.random.Generator,
    patient: _Patient,
    study: _Study,
    uid: Any,
    image_size: int,
    findings: dict[str, Any],
    degrade: np.random.Generator | None = None,
) -> int:
    site = patient.site
    n = site.dx_size(image_size)
    spacing = site.dx_field_of_view_mm / n
    m_lo, m_hi = site.modality_range
    finding = _dx_finding(rng, study.label)
    folder = out / f"p{patient.number:04d}" / f"s{study.index:02d}"
    for series_number, view in ((1, "PA"), (2, "LL")):
        img, located = _draw_dx(rng, n, patient.anatomy, study.label, view, finding)
        if degrade is not None:
            img = _degrade(img, degrade)
        stored = _to_stored(img, site, rng)
        ds = _base_dataset(patient, study, uid, "DX", DigitalXRayImageStorageForPresentation)
        ds.SeriesInstanceUID = uid("series", study.number, series_number)
        ds.SOPInstanceUID = uid("instance", study.number, series_number, 1)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SeriesDescription = "PA" if view == "PA" else "LATERAL"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = 1
        ds.ViewPosition = view
        ds.PatientOrientation = ["L", "F"] if view == "PA" else ["P", "F"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.PhotometricInterpretation = site.photometric
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if site.photometric == "MONOCHROME1" else -1
        ds.PresentationLUTShape = "INVERSE" if site.photometric == "MONOCHROME1" else "IDENTITY"
        ds.PixelSpacing = [_ds_str(spacing), _ds_str(spacing)]
        ds.ImagerPixelSpacing = [_ds_str(spacing), _ds_str(spacing)]
        ds.WindowCenter = _ds_str((m_lo + m_hi) / 2)
        ds.WindowWidth = _ds_str(m_hi - m_lo)
        ds.RescaleIntercept = _ds_str(site.rescale_intercept)
        ds.RescaleSlope = _ds_str(site.rescale_slope)
        ds.RescaleType = "US"
        _write(ds, stored, site.transfer_syntax, folder / f"se{series_number}" / "0001.dcm")
        if located is not None:
            findings[str(ds.SOPInstanceUID)] = {
                "level": "image",
                "label": study.label,
                "view": view,
                "study_instance_uid": str(ds.StudyInstanceUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "rows": n,
                "columns": n,
                **located,
            }
    return 2


def _ct_study_files(
    out: Path,
    rng: np.random.Generator,
    patient: _Patient,
    study: _Study,
    uid: Any,
    image_size: int,
    findings: dict[str, Any],
    degrade: np.random.Generator | None = None,
) -> int:
    site = patient.site
    n = image_size
    spacing = site.ct_field_of_view_mm / n
    thickness = float(_ds_str(spacing))
    volume, located = _draw_ct(rng, n, patient.anatomy, study.label, site)
    if degrade is not None:
        # Stored values are HU + 1024: squeeze towards the mean and add noise, as for DX.
        mean = float(volume.mean())
        noisy = mean + DEGRADE_CONTRAST * (volume.astype(np.float32) - mean)
        noisy += degrade.standard_normal(volume.shape).astype(np.float32) * DEGRADE_CT_NOISE_HU
        volume = np.clip(np.rint(noisy), 0, 2**site.bits_stored - 1).astype(volume.dtype)
    series_uid = uid("series", study.number, 1)
    frame_uid = uid("frame", study.number)
    origin = -site.ct_field_of_view_mm / 2 + spacing / 2
    z0 = -thickness * CT_SLICES / 2
    sop_uids: list[str] = []
    folder = out / f"p{patient.number:04d}" / f"s{study.index:02d}" / "se1"
    for k in range(CT_SLICES):
        ds = _base_dataset(patient, study, uid, "CT", CTImageStorage)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = uid("instance", study.number, 1, k + 1)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesDescription = f"AXIAL {CT_SLICES}"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.KVP = "120"
        ds.SliceThickness = _ds_str(thickness)
        ds.SpacingBetweenSlices = _ds_str(thickness)
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        z = z0 + k * thickness
        ds.ImagePositionPatient = [_ds_str(origin), _ds_str(origin), _ds_str(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds_str(z)
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelSpacing = [_ds_str(spacing), _ds_str(spacing)]
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        _write(ds, volume[k], site.transfer_syntax, folder / f"{k + 1:04d}.dcm")
        sop_uids.append(str(ds.SOPInstanceUID))
    if located is not None:
        findings[str(series_uid)] = {
            "level": "series",
            "label": study.label,
            "study_instance_uid": str(uid("study", study.number)),
            "rows": n,
            "columns": n,
            "slices": CT_SLICES,
            **located,
            "sop_instance_uids": sop_uids,
        }
    return CT_SLICES


def synthesize_cohort(
    out: Path,
    n_studies: int,
    seed: int,
    modality: Literal["DX", "CT"] = "DX",
    image_size: int = 256,
    progress: bool = False,
    multilabel: bool = False,
    degrade_site: str | None = None,
) -> SynthSummary:
    """Write a fake cohort under ``out`` (see the module docstring) and summarise it.

    ``multilabel`` (DX): some studies show a nodule and an effusion, labelled
    ``effusion;nodule``; without it the cohort is exactly as before.
    ``degrade_site``: a site name or institution whose images are made worse on purpose."""
    if modality not in ("DX", "CT"):
        raise UsageError(f"modality must be 'DX' or 'CT', not {modality!r}")
    if n_studies < 1:
        raise UsageError("n_studies must be at least 1")
    if image_size < 32:
        raise UsageError("image_size must be at least 32")
    if degrade_site is not None and not any(
        degrade_site in (site.name, site.institution) for site in SITES
    ):
        names = ", ".join(site.name for site in SITES)
        raise UsageError(f"degrade_site must be one of {names} (or its institution name)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    namespace = ["workbench.synth", str(seed), modality, str(n_studies), str(image_size)]

    def uid(*parts: Any) -> UID:
        # generate_uid joins its entropy sources with no separator ("1","11" == "11","1"):
        # join them ourselves so that distinct parts always give distinct UIDs.
        return generate_uid(entropy_srcs=["|".join([*namespace, *(str(p) for p in parts)])])

    patients, studies = _plan(rng, n_studies, modality, multilabel and modality == "DX")
    findings: dict[str, Any] = {}
    rows: list[tuple[str, str]] = []
    n_files = 0
    write_study = _dx_study_files if modality == "DX" else _ct_study_files
    iterator: Any = studies
    if progress:
        from tqdm import tqdm

        iterator = tqdm(studies, desc=f"synthesising {modality}", unit="study")
    for study in iterator:
        patient = patients[study.patient - 1]
        degrade = None
        if degrade_site in (patient.site.name, patient.site.institution):
            # Its own generator, so the main stream (and every other study) is unchanged.
            degrade = np.random.default_rng([seed, study.number, 1])
        n_files += write_study(out, rng, patient, study, uid, image_size, findings, degrade)
        rows.append((str(uid("study", study.number)), study.label))

    labels_csv = out / "labels.csv"
    with labels_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["StudyInstanceUID", "label"])
        writer.writerows(rows)
    (out / "findings.json").write_text(json.dumps(findings, indent=1, sort_keys=True) + "\n")
    classes = DX_CLASSES if modality == "DX" else CT_CLASSES
    counts = Counter(label for _, label in rows)
    return SynthSummary(
        out=out,
        labels_csv=labels_csv,
        n_patients=len(patients),
        n_studies=len(studies),
        n_files=n_files,
        class_counts={c: counts.get(c, 0) for c in (*classes, *sorted(set(counts) - set(classes)))},
    )
