"""AutoAugment's 14 image operations in JAX, matching Pillow pixel for pixel.

The original augmented one image at a time in Python with PIL. Here every op is one of three
batched primitives, so a policy stage costs one pass of each over the images that need it:

- `affine_warp`: shearX/Y, translateX/Y, rotate — four taps per pixel, one gather each;
- `apply_lut`: posterize, solarize, invert, autocontrast, equalize — a 256-entry table per
  image and channel;
- `blend`: color, contrast, brightness, sharpness — Pillow's ``Image.blend(degenerate,
  image, factor)`` with a per-image degenerate image.

The primitives work on planar batches (N, C, H, W) uint8: XLA on CPU vectorises badly over a
minor axis of 3 channels. In a policy stage each pass runs on the images whose op is of its
kind only, gathered into a smaller batch (`capacity_for`). The per-op functions in `OPS` take
one uint8 (H, W, 3) image and the op's value already mapped from its magnitude index (signed
shear factor, signed pixel offset, degrees, enhance factor, bits, threshold) and run the same
primitives on a batch of one, so the policy's batched path (`apply_stage`) and the per-op path
agree bit for bit: every float product that a fused multiply-add could change is rounded
explicitly (`rounded_product`), so results do not depend on how XLA fuses a program.

Pillow details reproduced (each decides parity on real images):
- affine transforms sample at pixel centres: output (x, y) reads the input at
  A·(x + 0.5, y + 0.5); pixels whose source centre is outside the image get the fill colour;
- nearest sampling uses Pillow's 16.16 fixed-point coordinates (its translation-only path
  floors the same coordinates in float64, to the same pixels);
- bicubic is Pillow's transform kernel (a = −1), taps clamped at the border, truncated to
  uint8. Pillow computes it in float64, here in float32: where a source coordinate is an
  exact integer (the policy's rational shear factors make some), the truncated value can
  land one grey level apart (about 6 values in 10,000); on an image edge, see `_on_image`;
- luma is ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``;
- blends run in float32 with the product rounded as in C (see `rounded_product`), truncated;
- SMOOTH ([[1,1,1],[1,5,1],[1,1,1]] / 13, +0.5, truncated, border kept) equals the integer
  (2·sum + 13) // 26: the exact value is never within 1/26 of an integer, float error is far
  smaller;
- autocontrast reproduces the float64 rounding of ``int(i * scale + offset)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

FILL = 128
NEAREST, CUBIC_X, CUBIC_Y = 0, 1, 2

WARP_OPS = ("shearX", "shearY", "translateX", "translateY", "rotate")
LUT_OPS = ("posterize", "solarize", "invert", "autocontrast", "equalize")
BLEND_OPS = ("color", "contrast", "brightness", "sharpness")
OP_NAMES = WARP_OPS + BLEND_OPS + LUT_OPS
KINDS = {
    **dict.fromkeys(WARP_OPS, "warp"),
    **dict.fromkeys(LUT_OPS, "lut"),
    **dict.fromkeys(BLEND_OPS, "blend"),
}

_IDENTITY_MATRIX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_PAD = 2  # edge padding that keeps every bicubic tap of an inside pixel in range


def to_planar(images: jax.Array) -> jax.Array:
    """(N, H, W, C) → (N, C, H, W)."""
    return jnp.transpose(images, (0, 3, 1, 2))


def from_planar(images: jax.Array) -> jax.Array:
    """(N, C, H, W) → (N, H, W, C)."""
    return jnp.transpose(images, (0, 2, 3, 1))


def _column(values: ArrayLike, n: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(values, jnp.float32), (n,))


# --------------------------------------------------------------------------- affine warp


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a = hi + lo, each with at most 12 significant bits."""
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFFF000)
    hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return hi, a - hi


def rounded_product(a: ArrayLike, x: ArrayLike) -> jax.Array:
    """float32 a·x rounded once, as C computes it, for x a multiple of 1/2 with |x| < 2048.

    XLA fuses a multiply into the following add (FMA) where it sees fit, which skips this
    rounding: results then move across a truncation or floor that follows, and a value
    recomputed in two fusions can differ between them. Both partial products here are
    exact, so their sum is the rounded product however the compiler fuses it.
    """
    hi, lo = _split(jnp.asarray(a, jnp.float32))
    return hi * x + lo * x


def _fixed(v: jax.Array) -> jax.Array:
    """Pillow's FIX(v): 16.16 fixed point, rounded half up."""
    return jnp.floor(v * 65536.0 + 0.5).astype(jnp.int32)


_EDGE = 2.0**-16  # coordinates this close to an image edge are on it


def _on_image(s: jax.Array, size: int) -> jax.Array:
    """Pillow's 0 <= s < size for a float64 source coordinate, from a float32 one.

    A coordinate exactly on an edge (as v·(y + ½) = −½ makes it for v = −1/15, a policy
    value) is off by ~1e-16 in Pillow, usually rounded onto the edge, but by ~1e-7 here, to
    either side: near an edge, the edge is taken. The fill then matches Pillow's.
    """
    s = jnp.where(jnp.abs(s) < _EDGE, 0.0, jnp.where(jnp.abs(s - size) < _EDGE, size, s))
    return (s >= 0) & (s < size)


def _warp_coords(matrix: jax.Array, mode: jax.Array, h: int, w: int):
    """For one image: per-pixel first-tap flat index into the edge-padded image, tap stride,
    fraction and inside mask.

    Nearest follows Pillow's fixed-point path (stride 0: four equal taps). Bicubic runs
    along one axis, which is exact when the other source coordinate lands on pixel centres,
    as for shears (the only bicubic ops here): Pillow's weights on that axis are then
    (0, 1, 0, 0). Taps start one pixel before the base; the 2-pixel edge padding clamps them.
    """
    a, b, c, d, e, f = (matrix[i] for i in range(6))
    yi, xi = jnp.mgrid[0:h, 0:w].astype(jnp.int32)
    xx = _fixed(c + b * 0.5 + a * 0.5) + xi * _fixed(a) + yi * _fixed(b)
    yy = _fixed(f + e * 0.5 + d * 0.5) + xi * _fixed(d) + yi * _fixed(e)
    near_x, near_y = xx >> 16, yy >> 16
    near_inside = (xx >= 0) & (yy >= 0) & (near_x < w) & (near_y < h)

    xc, yc = xi.astype(jnp.float32) + 0.5, yi.astype(jnp.float32) + 0.5
    # rounded products: the floor and the fraction below must see the very same coordinate,
    # whichever fusion XLA recomputes it in (with or without FMA)
    sx = rounded_product(a, xc) + rounded_product(b, yc) + c
    sy = rounded_product(d, xc) + rounded_product(e, yc) + f
    cubic_inside = _on_image(sx, w) & _on_image(sy, h)
    along_y = mode == CUBIC_Y
    main = jnp.where(along_y, sy, sx) - 0.5
    main_base = jnp.floor(main)
    frac = main - main_base
    main_base = main_base.astype(jnp.int32)
    other = jnp.floor(jnp.where(along_y, sx, sy) - 0.5).astype(jnp.int32)

    nearest = mode == NEAREST
    col = jnp.where(nearest, near_x, jnp.where(along_y, other, main_base))
    row = jnp.where(nearest, near_y, jnp.where(along_y, main_base, other))
    inside = jnp.where(nearest, near_inside, cubic_inside)
    frac = jnp.where(nearest, 0.0, frac)
    stride = jnp.where(nearest, 0, jnp.where(along_y, w + 2 * _PAD, 1))
    # outside pixels are clamped in range, read, and then filled
    col = jnp.clip(col, -1, w - 1) + _PAD - jnp.where(nearest, 0, jnp.where(along_y, 0, 1))
    row = jnp.clip(row, -1, h - 1) + _PAD - jnp.where(nearest, 0, jnp.where(along_y, 1, 0))
    return row * (w + 2 * _PAD) + col, stride, frac, inside


def _pack(images: jax.Array) -> jax.Array:
    """(N, C ≤ 4, H, W) uint8 → (N, H, W) uint32, channel c in byte c: one gather per tap."""
    x = images.astype(jnp.uint32)
    return functools.reduce(jnp.bitwise_or, [x[:, c] << (8 * c) for c in range(x.shape[1])])


def affine_warp(
    images: jax.Array, matrices: jax.Array, modes: jax.Array, fill: int = FILL
) -> jax.Array:
    """Pillow's ``transform(size, AFFINE, matrix, resample, fillcolor=fill)`` on a batch.

    ``images`` (N, C ≤ 4, H, W) uint8. ``matrices`` (N, 6) holds Pillow's (a, b, c, d, e, f):
    output (x, y) reads the input at (a·x' + b·y' + c, d·x' + e·y' + f), x' = x + 0.5,
    y' = y + 0.5. ``modes`` (N,): NEAREST, CUBIC_X (bicubic along x: shearX) or CUBIC_Y
    (along y: shearY). Nearest repeats one tap four times, which the cubic returns unchanged.
    """
    n, ch, h, w = images.shape
    base, stride, frac, inside = jax.vmap(functools.partial(_warp_coords, h=h, w=w))(
        matrices.astype(jnp.float32), modes
    )
    padded = jnp.pad(_pack(images), ((0, 0), (_PAD, _PAD), (_PAD, _PAD)), mode="edge")
    size = (h + 2 * _PAD) * (w + 2 * _PAD)
    base = base + (jnp.arange(n, dtype=jnp.int32) * size)[:, None, None]
    stride = stride[:, None, None]
    flat = padded.reshape(-1)
    taps = [flat[base + k * stride] for k in range(4)]
    # Pillow's cubic v2 + t·p2 + t²·p3 + t³·p4 (p integer), each term rounded once, so the
    # result does not depend on how XLA fuses it into a program
    frac2 = frac * frac
    frac3 = frac2 * frac
    planes = []
    for c in range(ch):
        v1, v2, v3, v4 = (((t >> (8 * c)) & 255).astype(jnp.float32) for t in taps)
        value = (
            v2
            + rounded_product(frac, v3 - v1)
            + rounded_product(frac2, 2.0 * (v1 - v2) + v3 - v4)
            + rounded_product(frac3, v2 - v1 + v4 - v3)
        )
        value = jnp.clip(value, 0.0, 255.0).astype(jnp.uint8)
        planes.append(jnp.where(inside, value, jnp.uint8(fill)))
    return jnp.stack(planes, axis=1)


def shear_x_matrix(values: jax.Array, h: int, w: int) -> tuple[jax.Array, int]:
    """Output (x, y) reads (x + v·y, y), bicubic along x."""
    one, zero = jnp.ones_like(values), jnp.zeros_like(values)
    return jnp.stack([one, values, zero, zero, one, zero], -1), CUBIC_X


def shear_y_matrix(values: jax.Array, h: int, w: int) -> tuple[jax.Array, int]:
    """Output (x, y) reads (x, y + v·x), bicubic along y."""
    one, zero = jnp.ones_like(values), jnp.zeros_like(values)
    return jnp.stack([one, zero, zero, values, one, zero], -1), CUBIC_Y


def translate_x_matrix(values: jax.Array, h: int, w: int) -> tuple[jax.Array, int]:
    """Output (x, y) reads (x + v, y), nearest."""
    one, zero = jnp.ones_like(values), jnp.zeros_like(values)
    return jnp.stack([one, zero, values, zero, one, zero], -1), NEAREST


def translate_y_matrix(values: jax.Array, h: int, w: int) -> tuple[jax.Array, int]:
    """Output (x, y) reads (x, y + v), nearest."""
    one, zero = jnp.ones_like(values), jnp.zeros_like(values)
    return jnp.stack([one, zero, zero, zero, one, values], -1), NEAREST


def rotate_matrix(degrees: jax.Array, h: int, w: int) -> tuple[jax.Array, int]:
    """Pillow's ``rotate``: counter-clockwise about (w/2, h/2), nearest."""
    angle = -jnp.deg2rad(degrees)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    c = rounded_product(cos, -cx) + rounded_product(sin, -cy) + cx
    f = rounded_product(-sin, -cx) + rounded_product(cos, -cy) + cy
    return jnp.stack([cos, sin, c, -sin, cos, f], -1), NEAREST


WARP_PARAMS: dict[str, Callable[[jax.Array, int, int], tuple[jax.Array, int]]] = {
    "shearX": shear_x_matrix,
    "shearY": shear_y_matrix,
    "translateX": translate_x_matrix,
    "translateY": translate_y_matrix,
    "rotate": rotate_matrix,
}


# --------------------------------------------------------------------------- lookup tables


def _flat_index(images: jax.Array) -> jax.Array:
    """Index of each value into a flat (N·C·256) table: value + 256·(n·C + c)."""
    n, ch = images.shape[:2]
    offsets = jnp.arange(n * ch, dtype=jnp.int32).reshape(n, ch, 1, 1) * 256
    return images.astype(jnp.int32) + offsets


def apply_lut(images: jax.Array, luts: jax.Array) -> jax.Array:
    """out[n, c, y, x] = luts[n, c, images[n, c, y, x]], as Pillow's ``Image.point``."""
    return luts.reshape(-1)[_flat_index(images)]


def _levels() -> jax.Array:
    return jnp.arange(256, dtype=jnp.int32)


def _shared_lut(lut: jax.Array, ch: int) -> jax.Array:
    """(N, 256) int → (N, C, 256) uint8: one table for every channel."""
    lut = jnp.clip(lut, 0, 255).astype(jnp.uint8)
    return jnp.broadcast_to(lut[:, None, :], (lut.shape[0], ch, 256))


def posterize_lut(images: jax.Array, bits: jax.Array) -> jax.Array:
    """ImageOps.posterize: keep the top ``bits`` bits (bits 8 is the identity)."""
    bits = jnp.round(bits).astype(jnp.int32)
    mask = 255 - ((1 << (8 - bits)) - 1)
    return _shared_lut(_levels()[None, :] & mask[:, None], images.shape[1])


def solarize_lut(images: jax.Array, thresholds: jax.Array) -> jax.Array:
    """ImageOps.solarize: invert every value ≥ threshold."""
    levels = _levels()[None, :]
    lut = jnp.where(levels < thresholds[:, None], levels, 255 - levels)
    return _shared_lut(lut, images.shape[1])


def invert_lut(images: jax.Array, values: jax.Array) -> jax.Array:
    """ImageOps.invert: 255 − x."""
    return _shared_lut(jnp.broadcast_to(255 - _levels(), (images.shape[0], 256)), images.shape[1])


def channel_histograms(images: jax.Array) -> jax.Array:
    """(N, C, 256) int32 per-channel histograms, as Pillow's ``Image.histogram``."""
    n, ch = images.shape[:2]
    counts = jnp.zeros(n * ch * 256, jnp.int32).at[_flat_index(images).reshape(-1)].add(1)
    return counts.reshape(n, ch, 256)


@functools.cache
def _autocontrast_low_keys() -> tuple[np.ndarray, int]:
    """Sorted keys (lo·256 + hi)·256 + i where Pillow's float64 ``int(i·scale + offset)``
    is one below the exact 255·(i − lo) // (hi − lo) (at exact integers, 12,094 of them),
    and the most keys one (lo, hi) has."""
    keys = []
    for span in range(1, 256):
        scale = 255.0 / span
        lo = np.arange(0, 256 - span, dtype=np.int64)[:, None]
        i = lo + np.arange(span + 1, dtype=np.int64)[None, :]
        low = (i * scale + (-lo * scale)).astype(np.int64) < (255 * (i - lo)) // span
        lo_low = np.broadcast_to(lo, i.shape)[low]
        keys.append((lo_low * 256 + lo_low + span) * 256 + i[low])
    keys = np.sort(np.concatenate(keys)).astype(np.int32)
    return keys, int(np.unique(keys // 256, return_counts=True)[1].max())


def _autocontrast_low(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """(N, C, 256) int32: 1 where Pillow's float64 autocontrast rounds one below exact."""
    table, most = _autocontrast_low_keys()
    keys = jnp.asarray(table)
    pair = lo * 256 + hi
    first = jnp.searchsorted(keys, pair * 256)
    candidates = keys[jnp.clip(first[..., None] + jnp.arange(most), 0, len(table) - 1)]
    hit = (candidates // 256) == pair[..., None]
    n, ch = lo.shape
    rows = jnp.arange(n * ch, dtype=jnp.int32).reshape(n, ch, 1) * 256
    index = jnp.where(hit, rows + candidates % 256, n * ch * 256)
    low = jnp.zeros(n * ch * 256, jnp.int32).at[index.reshape(-1)].add(1, mode="drop")
    return low.reshape(n, ch, 256)


def autocontrast_lut(images: jax.Array, values: jax.Array) -> jax.Array:
    """ImageOps.autocontrast (cutoff 0): per channel, stretch min..max to 0..255."""
    lo = images.min(axis=(2, 3)).astype(jnp.int32)
    hi = images.max(axis=(2, 3)).astype(jnp.int32)
    span = jnp.maximum(hi - lo, 1)[..., None]
    lut = (255 * (_levels() - lo[..., None])) // span - _autocontrast_low(lo, hi)
    lut = jnp.where((hi > lo)[..., None], jnp.clip(lut, 0, 255), _levels())
    return lut.astype(jnp.uint8)


def equalize_lut(images: jax.Array, values: jax.Array) -> jax.Array:
    """ImageOps.equalize: step = (count − count of the last value) // 255, cumulative lut."""
    hist = channel_histograms(images)
    levels = _levels()
    last = jnp.max(jnp.where(hist > 0, levels, -1), axis=-1, keepdims=True)
    last_count = jnp.take_along_axis(hist, last, axis=-1)
    step = (hist.sum(-1, keepdims=True) - last_count) // 255
    before = jnp.cumsum(hist, axis=-1) - hist
    lut = (step // 2 + before) // jnp.maximum(step, 1)
    return jnp.where(step > 0, jnp.clip(lut, 0, 255), levels).astype(jnp.uint8)


LUT_PARAMS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "posterize": posterize_lut,
    "solarize": solarize_lut,
    "invert": invert_lut,
    "autocontrast": autocontrast_lut,
    "equalize": equalize_lut,
}


# --------------------------------------------------------------------------- blends


def blend(degenerate: jax.Array, images: jax.Array, factors: jax.Array) -> jax.Array:
    """Pillow's ``Image.blend(degenerate, image, factor)``: float32, truncated, clipped."""
    alpha = factors.astype(jnp.float32)[:, None, None, None]
    d = degenerate.astype(jnp.float32)
    value = d + rounded_product(alpha, images.astype(jnp.float32) - d)
    return jnp.clip(value, 0.0, 255.0).astype(jnp.uint8)


def luma(images: jax.Array) -> jax.Array:
    """Pillow's RGB → L: (19595 R + 38470 G + 7471 B + 2**15) >> 16, shape (N, H, W)."""
    r, g, b = (images[:, c].astype(jnp.int32) for c in range(3))
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def gray_degenerate(images: jax.Array) -> jax.Array:
    """ImageEnhance.Color: the L image back in RGB."""
    return jnp.broadcast_to(luma(images)[:, None], images.shape).astype(jnp.uint8)


def mean_degenerate(images: jax.Array) -> jax.Array:
    """ImageEnhance.Contrast: a flat image of int(mean(L) + 0.5)."""
    n, _, h, w = images.shape
    mean = (2 * luma(images).sum(axis=(1, 2)) + h * w) // (2 * h * w)
    return jnp.broadcast_to(mean[:, None, None, None], images.shape).astype(jnp.uint8)


def black_degenerate(images: jax.Array) -> jax.Array:
    """ImageEnhance.Brightness: black."""
    return jnp.zeros_like(images)


def smooth_degenerate(images: jax.Array) -> jax.Array:
    """ImageEnhance.Sharpness: ImageFilter.SMOOTH, border pixels kept."""
    x = images.astype(jnp.int32)
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    total = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:] + 4 * x[:, :, 1:-1, 1:-1]
    inner = ((2 * total + 13) // 26).astype(jnp.uint8)
    return images.at[:, :, 1:-1, 1:-1].set(inner)


BLEND_DEGENERATES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "color": gray_degenerate,
    "contrast": mean_degenerate,
    "brightness": black_degenerate,
    "sharpness": smooth_degenerate,
}


# --------------------------------------------------------------------------- ops by name

# Ops whose table depends on the image (a histogram or its range), worth computing only for
# the images that need them.
IMAGE_LUTS = ("autocontrast", "equalize")


def _masked_rows(fn, mask: jax.Array, capacity: int | None, default: jax.Array, *args):
    """``default`` with the rows where ``mask`` is set replaced by those of ``fn(*args)``.

    With a capacity below the batch size, ``fn`` runs only on the masked rows of ``args``,
    gathered into a batch of that size, and on the whole batch when more rows are masked
    (rare by choice of capacity). A loop over chunks would also do, but XLA on CPU runs
    the body of a while loop several times slower.
    """
    n = mask.shape[0]

    def full():
        return jnp.where(mask.reshape((n,) + (1,) * (default.ndim - 1)), fn(*args), default)

    if capacity is None or capacity >= n:
        return full()

    def subset():
        index = jnp.nonzero(mask, size=capacity, fill_value=n)[0]
        rows = jnp.minimum(index, n - 1)
        return default.at[index].set(fn(*(a[rows] for a in args)), mode="drop")

    return jax.lax.cond(mask.sum() <= capacity, subset, full)


def _warp_step(names, images, which, values, capacities):
    """Warp each image with the matrix of op ``names[which[i]]`` (identity if which = −1)."""
    n, _, h, w = images.shape
    matrices = jnp.broadcast_to(jnp.asarray(_IDENTITY_MATRIX, jnp.float32), (n, 6))
    modes = jnp.full((n,), NEAREST, jnp.int32)
    for j, name in enumerate(names):
        matrix, mode = WARP_PARAMS[name](values, h, w)
        matrices = jnp.where((which == j)[:, None], matrix, matrices)
        modes = jnp.where(which == j, mode, modes)
    return affine_warp(images, matrices, modes)


def _lut_step(names, images, which, values, capacities):
    """Map each image through the table of op ``names[which[i]]`` (identity if which = −1)."""
    n, ch = images.shape[:2]
    luts = jnp.broadcast_to(jnp.arange(256, dtype=jnp.uint8), (n, ch, 256))
    for j, name in enumerate(names):
        if name in IMAGE_LUTS:
            capacity = capacities.get(name)
            luts = _masked_rows(LUT_PARAMS[name], which == j, capacity, luts, images, values)
        else:
            luts = jnp.where((which == j)[:, None, None], LUT_PARAMS[name](images, values), luts)
    return apply_lut(images, luts)


def _blend_step(names, images, which, values, capacities):
    """Blend each image with the degenerate of op ``names[which[i]]`` (unchanged if −1)."""
    degenerate = BLEND_DEGENERATES[names[0]](images)
    for j, name in enumerate(names[1:], start=1):
        chosen = (which == j)[:, None, None, None]
        degenerate = jnp.where(chosen, BLEND_DEGENERATES[name](images), degenerate)
    return blend(degenerate, images, jnp.where(which >= 0, values, 1.0))


_STEPS = {"warp": _warp_step, "lut": _lut_step, "blend": _blend_step}


def apply_planar(name: str, images: jax.Array, values: ArrayLike) -> jax.Array:
    """Op ``name`` on a planar batch (N, C, H, W) with one value per image."""
    n = images.shape[0]
    which = jnp.zeros((n,), jnp.int32)
    return _STEPS[KINDS[name]]((name,), images, which, _column(values, n), {})


def _single_op(name: str) -> Callable[[jax.Array, ArrayLike], jax.Array]:
    def op(image: jax.Array, value: ArrayLike = 0.0) -> jax.Array:
        planar = to_planar(jnp.asarray(image)[None])
        return from_planar(apply_planar(name, planar, jnp.reshape(value, (1,))))[0]

    op.__name__ = name
    op.__doc__ = f"AutoAugment's {name} on one uint8 (H, W, 3) image; value already mapped."
    return op


OPS: dict[str, Callable[[jax.Array, ArrayLike], jax.Array]] = {
    name: _single_op(name) for name in OP_NAMES
}


# --------------------------------------------------------------------------- policy stage


def apply_stage(
    images: jax.Array,
    op_names: Sequence[str],
    op_index: jax.Array,
    values: jax.Array,
    fired: jax.Array,
    capacities: Mapping[str, int] | None = None,
) -> jax.Array:
    """One policy stage on a planar batch: image i gets ``op_names[op_index[i]]`` with
    ``values[i]`` if ``fired[i]``, else is left alone.

    Ops are grouped by kind (warp, lut, blend); each kind is one batched pass over the images
    whose op is of that kind. ``capacities`` sets, per kind and per op of `IMAGE_LUTS`, the
    batch size of those passes (`capacity_for`); a pass covers the whole batch without one,
    or when more images need it.
    """
    unknown = [name for name in op_names if name not in KINDS]
    if unknown:
        raise ValueError(f"unknown AutoAugment ops {unknown}; expected names from {OP_NAMES}")
    capacities = dict(capacities or {})
    values = values.astype(jnp.float32)
    for kind, step in _STEPS.items():
        names = tuple(dict.fromkeys(name for name in op_names if KINDS[name] == kind))
        if not names:
            continue
        local = jnp.asarray(
            [names.index(name) if KINDS[name] == kind else -1 for name in op_names], jnp.int32
        )
        mask = fired & (local[op_index] >= 0)
        which = jnp.where(mask, local[op_index], -1)
        run = functools.partial(step, names, capacities=capacities)
        images = _masked_rows(run, mask, capacities.get(kind), images, images, which, values)
    return images


def capacity_for(n: int, probability: float) -> int:
    """Batch size for a pass that ~Binomial(n, p) images need: mean + 2.5 standard deviations
    + 2, a multiple of 4. Near the best trade: a pass costs about its batch size, and the
    rare overflow (~1%) costs a whole-batch pass."""
    spread = 2.5 * math.sqrt(n * probability * (1.0 - probability))
    return min(n, 4 * math.ceil((n * probability + spread + 2.0) / 4))
