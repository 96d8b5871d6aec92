"""Procedural portrait-like composites with exact alpha, foreground and background.

Used by the `p3m10k/synthetic` builder config (quickstart, tests, benchmarks)
and by `make_dummy_data.py`. Each sample is a person-like silhouette (head,
neck, shoulders) with anti-aliased soft edges and thin hair-like strands of
partial alpha, a textured foreground and background, and a face region (the
`facemask`) that is Gaussian-blurred in the foreground when `blur_face` is set,
like the face obfuscation of P3M-10k.

The stored maps satisfy the compositing equation exactly in uint8 terms:
`image == round(a * fg + (1 - a) * bg)` with `a = alpha / 255`. Everything is
a pure function of the seed and the size (deterministic across runs).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from tfds_p3m10k import maps

# Drawing happens at this many times the output resolution, then area-averaged:
# edge pixels get fractional coverage (soft alpha) without any blur.
_SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class SyntheticPortrait:
    """One rendered sample; all arrays uint8, HxW maps are 2-D."""

    image: np.ndarray  # HxWx3, composite of fg over bg with alpha
    alpha: np.ndarray  # HxW, 0..255
    fg: np.ndarray  # HxWx3 (face region blurred when blur_face)
    bg: np.ndarray  # HxWx3
    facemask: np.ndarray  # HxW, 0 or 255
    trimap: np.ndarray  # HxW, 0 / 128 / 255 (derived from alpha)


def sample_seed(base_seed: int, split_index: int, example_index: int) -> int:
    """A stable 32-bit seed for one example of one split."""
    sequence = np.random.SeedSequence([base_seed, split_index, example_index])
    return int(sequence.generate_state(1)[0])


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.random((cells, cells, channels)).astype(np.float32)
    noise = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    noise = noise.reshape(height, width, channels)
    return np.clip(noise, 0.0, 1.0)


def _stripes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A 0..1 sinusoidal stripe pattern of random orientation and period."""
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(0.04, 0.15) * max(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
    return 0.5 + 0.5 * np.sin(phase)


def _texture(rng: np.random.Generator, height: int, width: int, base_rgb: np.ndarray, contrast: float) -> np.ndarray:
    """A float HxWx3 texture around `base_rgb`: smooth colour noise plus stripes."""
    noise = _smooth_noise(rng, height, width, cells=int(rng.integers(3, 7)), channels=3)
    stripes = _stripes(rng, height, width)[..., None]
    tint = rng.uniform(-0.5, 0.5, size=3).astype(np.float32)
    texture = base_rgb + contrast * (noise - 0.5) + 0.5 * contrast * (stripes - 0.5) * tint
    return np.clip(texture, 0.0, 1.0)


def _coverage(canvas: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-average a supersampled uint8 0/255 canvas to float coverage in [0, 1]."""
    small = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) / 255.0


def _draw_strands(rng, shape, head_c, head_radii, tilt, unit) -> np.ndarray:
    """Thin strands from the top of the head outwards on one canvas (supersampled, uint8): each strand's
    value is its opacity, a later strand overwriting an earlier one where they cross."""
    big_h, big_w = shape
    head_rx, head_ry = head_radii
    strands = np.zeros((big_h, big_w), np.uint8)
    for _ in range(int(rng.integers(18, 36))):
        angle = np.deg2rad(rng.uniform(-170, -10) + tilt)
        start = np.array([head_c[0] + head_rx * 1.05 * np.cos(angle), head_c[1] + head_ry * 1.05 * np.sin(angle)])
        length = rng.uniform(0.05, 0.2) * unit
        bend = rng.uniform(-0.6, 0.6)
        turns = angle + bend * np.linspace(0.0, 1.0, 13)
        steps = np.stack([np.cos(turns), np.sin(turns)], axis=-1) * (length / 12)
        points = start + np.concatenate([[[0.0, 0.0]], np.cumsum(steps[1:], axis=0)])
        thickness = int(rng.integers(1, 3))
        opacity = rng.uniform(0.5, 1.0)
        cv2.polylines(
            strands,
            [np.round(points).astype(np.int32)],
            False,
            int(round(opacity * 255)),
            thickness=thickness,
            lineType=cv2.LINE_8,
        )
    return strands


def _draw_features(shape, head_c, head_radii) -> np.ndarray:
    """The eyes and the mouth on a supersampled canvas (uint8), so that the face blur removes detail."""
    big_h, big_w = shape
    head_rx, head_ry = head_radii
    features = np.zeros((big_h, big_w), np.uint8)
    eye_dy = int(-0.05 * head_ry)
    for side in (-1, 1):
        cv2.ellipse(
            features,
            (head_c[0] + int(side * 0.35 * head_rx), head_c[1] + eye_dy),
            (max(1, int(0.12 * head_rx)), max(1, int(0.07 * head_ry))),
            0,
            0,
            360,
            255,
            -1,
        )
    cv2.ellipse(
        features,
        (head_c[0], head_c[1] + int(0.5 * head_ry)),
        (max(1, int(0.3 * head_rx)), max(1, int(0.06 * head_ry))),
        0,
        0,
        360,
        255,
        -1,
    )
    return features


def render_portrait(seed: int, height: int = 128, width: int = 128, blur_face: bool = True) -> SyntheticPortrait:
    """Renders one synthetic portrait; see the module docstring."""
    if height < 16 or width < 16:
        raise ValueError(f"synthetic images must be at least 16x16, got {height}x{width}")
    rng = np.random.default_rng(seed)
    s = _SUPERSAMPLE
    big_h, big_w = height * s, width * s
    unit = min(height, width) * s  # geometry is relative to the short side

    def pt(x: float, y: float) -> tuple[int, int]:
        return int(round(x * big_w)), int(round(y * big_h))

    # --- Geometry (fractions of the image) ---
    cx = rng.uniform(0.4, 0.6)
    cy = rng.uniform(0.3, 0.42)
    head_rx = rng.uniform(0.11, 0.15) * unit
    head_ry = head_rx * rng.uniform(1.15, 1.35)
    tilt = rng.uniform(-12, 12)
    head_c = pt(cx, cy)
    body = np.zeros((big_h, big_w), np.uint8)
    cv2.ellipse(body, head_c, (int(head_rx), int(head_ry)), tilt, 0, 360, 255, -1)
    neck_w = 0.45 * head_rx
    neck_top = head_c[1] + int(0.6 * head_ry)
    neck_bottom = head_c[1] + int(1.35 * head_ry)
    cv2.rectangle(body, (int(head_c[0] - neck_w), neck_top), (int(head_c[0] + neck_w), neck_bottom), 255, -1)
    torso_c = (head_c[0] + int(rng.uniform(-0.05, 0.05) * unit), neck_bottom + int(0.55 * unit))
    torso_axes = (int(rng.uniform(0.3, 0.42) * unit), int(0.6 * unit))
    cv2.ellipse(body, torso_c, torso_axes, rng.uniform(-6, 6), 0, 360, 255, -1)

    # Hair cap: a slightly larger ellipse, kept above a hair line across the head.
    hair = np.zeros_like(body)
    cv2.ellipse(hair, head_c, (int(head_rx * 1.12), int(head_ry * 1.1)), tilt, 0, 360, 255, -1)
    hair_line = head_c[1] - int(head_ry * rng.uniform(0.2, 0.45))
    hair[hair_line:] = 0
    body = np.maximum(body, hair)

    # Face (the region P3M-10k obfuscates): an ellipse inside the head, below the hair line.
    face = np.zeros_like(body)
    cv2.ellipse(
        face,
        (head_c[0], head_c[1] + int(0.15 * head_ry)),
        (int(head_rx * 0.8), int(head_ry * 0.75)),
        tilt,
        0,
        360,
        255,
        -1,
    )
    face[:hair_line] = 0

    # Thin strands from the top of the head outwards: 1-2 supersampled pixels
    # wide, so after area-averaging they carry partial alpha.
    # One canvas for all strands; each strand's value is its opacity (a later
    # strand overwrites an earlier one where they cross).
    strands = _draw_strands(rng, (big_h, big_w), head_c, (head_rx, head_ry), tilt, unit)

    body_cov = _coverage(body, height, width)
    # A slight blur gives the silhouette the soft falloff of real mattes.
    edge_sigma = rng.uniform(0.3, 0.9)
    body_cov = cv2.GaussianBlur(body_cov, (0, 0), edge_sigma)
    body_cov[_coverage(body, height, width) >= 0.999] = 1.0  # keep the inside opaque
    strand_cov = _coverage(strands, height, width)
    alpha_f = np.maximum(body_cov, strand_cov)
    alpha = np.clip(np.round(alpha_f * 255.0), 0, 255).astype(np.uint8)

    hair_cov = np.maximum(_coverage(hair, height, width), strand_cov)
    face_cov = _coverage(face, height, width)
    facemask = np.where(face_cov >= 0.5, 255, 0).astype(np.uint8)

    # --- Colours and textures ---
    bg = _texture(rng, height, width, rng.uniform(0.15, 0.85, 3).astype(np.float32), 0.5)
    clothes = _texture(rng, height, width, rng.uniform(0.1, 0.9, 3).astype(np.float32), 0.4)
    skin_rgb = np.array([0.85, 0.65, 0.5], np.float32) * rng.uniform(0.55, 1.1)
    skin = _texture(rng, height, width, np.clip(skin_rgb, 0, 1), 0.08)
    hair_rgb = rng.uniform(0.02, 0.5) * np.array([1.0, 0.8, 0.6], np.float32)
    hair_tex = _texture(rng, height, width, hair_rgb, 0.12)
    head_and_neck = _coverage(np.where(hair > 0, 0, body), height, width)
    head_and_neck[int(torso_c[1] / s - torso_axes[1] / s * 0.9) :] = 0
    fg = clothes
    fg = fg * (1 - head_and_neck[..., None]) + skin * head_and_neck[..., None]
    fg = fg * (1 - hair_cov[..., None]) + hair_tex * hair_cov[..., None]
    # Eyes and mouth, so that the face blur visibly removes detail.
    features = _draw_features((big_h, big_w), head_c, (head_rx, head_ry))
    feature_cov = _coverage(features, height, width)[..., None] * (face_cov[..., None])
    fg = fg * (1 - 0.8 * feature_cov)
    fg = np.clip(np.round(fg * 255.0), 0, 255).astype(np.uint8)
    bg = np.clip(np.round(bg * 255.0), 0, 255).astype(np.uint8)

    if blur_face:
        sigma = max(1.0, min(height, width) / 40.0)
        blurred = cv2.GaussianBlur(fg, (0, 0), sigma)
        weight = cv2.GaussianBlur(facemask.astype(np.float32) / 255.0, (0, 0), 1.0)[..., None]
        fg = np.clip(np.round(fg * (1 - weight) + blurred * weight), 0, 255).astype(np.uint8)

    image = composite(fg, bg, alpha)
    trimap = maps.derive_trimap(alpha, maps.trimap_kernel_size(height, width))
    return SyntheticPortrait(image=image, alpha=alpha, fg=fg, bg=bg, facemask=facemask, trimap=trimap)


def composite(fg: np.ndarray, bg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`round(a * fg + (1 - a) * bg)` in uint8, with `a = alpha / 255` (HxW alpha)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    mixed = a * fg.astype(np.float64) + (1.0 - a) * bg.astype(np.float64)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)
