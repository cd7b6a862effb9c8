"""AutoAugment's 14 image operations in JAX, matching Pillow pixel for pixel.

The original augmented one image at a time in Python with PIL. Here every op is one of three
batched primitives, so a policy stage costs one pass of each over the whole batch:

- `affine_warp`: shearX/Y, translateX/Y, rotate — one gather of four taps per pixel;
- `apply_lut`: posterize, solarize, invert, autocontrast, equalize — a 256-entry table per
  image and channel;
- `blend`: color, contrast, brightness, sharpness — Pillow's ``Image.blend(degenerate, image,
  factor)`` with a per-image degenerate image.

The per-op functions in `OPS` take one uint8 (H, W, 3) image and the op's value already
mapped from its magnitude index (signed shear factor, signed pixel offset, degrees, enhance
factor, bits, threshold). They run the same batched code on a batch of one, so the policy's
batched path (`apply_stage`) and the per-op path cannot disagree.

Pillow details reproduced (each decides parity on real images):
- affine transforms sample at pixel centres: output (x, y) reads the input at
  A·(x + 0.5, y + 0.5); pixels whose source centre is outside the image get the fill colour;
- nearest sampling uses Pillow's 16.16 fixed-point coordinates;
- bicubic is Pillow's transform kernel (a = −1, Horner form), taps clamped at the border,
  truncated to uint8;
- luma is ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``; blends run in float32 with every
  product rounded as in C (see `rounded_product`) and truncate;
- SMOOTH is [[1,1,1],[1,5,1],[1,1,1]]/13 in float32 with +0.5 and truncation, border kept;
- autocontrast reproduces the float64 rounding of ``int(i * scale + offset)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

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

_IDENTITY_MATRIX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# --------------------------------------------------------------------------- affine warp


def _fixed(v: jax.Array) -> jax.Array:
    """Pillow's FIX(v): 16.16 fixed point, rounded half up."""
    return jnp.floor(v * 65536.0 + 0.5).astype(jnp.int32)


def _nearest_taps(matrix: jax.Array, h: int, w: int) -> tuple[jax.Array, jax.Array]:
    """Flat source index and inside mask of Pillow's fixed-point nearest affine sampling."""
    a, b, c, d, e, f = (matrix[i] for i in range(6))
    a0, a1, a3, a4 = _fixed(a), _fixed(b), _fixed(d), _fixed(e)
    xo = _fixed(c + b * 0.5 + a * 0.5)
    yo = _fixed(f + e * 0.5 + d * 0.5)
    y, x = jnp.mgrid[0:h, 0:w].astype(jnp.int32)
    xx = xo + x * a0 + y * a1
    yy = yo + x * a3 + y * a4
    ix, iy = xx >> 16, yy >> 16
    inside = (xx >= 0) & (yy >= 0) & (ix < w) & (iy < h)
    index = jnp.clip(iy, 0, h - 1) * w + jnp.clip(ix, 0, w - 1)
    return index, inside


def _cubic_taps(
    matrix: jax.Array, h: int, w: int, along_y: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Four flat tap indices, fraction and inside mask of Pillow's bicubic along one axis.

    Exact when the other source coordinate lands on pixel centres, as it does for shears
    (the only bicubic ops of AutoAugment): Pillow's second-axis weight is then (0, 1, 0, 0).
    """
    a, b, c, d, e, f = (matrix[i] for i in range(6))
    y, x = jnp.mgrid[0:h, 0:w].astype(jnp.float32)
    sx = a * (x + 0.5) + b * (y + 0.5) + c
    sy = d * (x + 0.5) + e * (y + 0.5) + f
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    main, other = (sy, sx) if along_y else (sx, sy)
    main_size, other_size = (h, w) if along_y else (w, h)
    main_stride, other_stride = (w, 1) if along_y else (1, w)
    pos = main - 0.5
    base = jnp.floor(pos)
    frac = pos - base
    base = base.astype(jnp.int32)
    fixed = jnp.clip(jnp.floor(other - 0.5).astype(jnp.int32), 0, other_size - 1)
    taps = [
        jnp.clip(base + (k - 1), 0, main_size - 1) * main_stride + fixed * other_stride
        for k in range(4)
    ]
    return jnp.stack(taps, axis=-1), frac, inside


def _warp_taps(matrix: jax.Array, mode: jax.Array, h: int, w: int):
    """Per-pixel taps (H·W, 4), fraction (H·W,) and inside mask (H·W,) for one image."""
    n_index, n_inside = _nearest_taps(matrix, h, w)
    x_index, x_frac, x_inside = _cubic_taps(matrix, h, w, along_y=False)
    y_index, y_frac, y_inside = _cubic_taps(matrix, h, w, along_y=True)
    nearest = jnp.broadcast_to(n_index[..., None], x_index.shape)
    index = jnp.where(mode == NEAREST, nearest, jnp.where(mode == CUBIC_X, x_index, y_index))
    frac = jnp.where(mode == NEAREST, 0.0, jnp.where(mode == CUBIC_X, x_frac, y_frac))
    inside = jnp.where(mode == NEAREST, n_inside, jnp.where(mode == CUBIC_X, x_inside, y_inside))
    return index.reshape(h * w, 4), frac.reshape(h * w), inside.reshape(h * w)


def affine_warp(
    images: jax.Array, matrices: jax.Array, modes: jax.Array, fill: int = FILL
) -> jax.Array:
    """Pillow's ``transform(size, AFFINE, matrix, resample, fillcolor=fill)`` on a batch.

    ``matrices`` (N, 6) holds Pillow's (a, b, c, d, e, f): output (x, y) reads the input at
    (a·x' + b·y' + c, d·x' + e·y' + f) with x' = x + 0.5, y' = y + 0.5. ``modes`` (N,) is
    NEAREST, CUBIC_X (bicubic along x, for shearX) or CUBIC_Y (along y, for shearY). Nearest
    pixels repeat one tap four times, so the bicubic polynomial returns them unchanged.
    """
    n, h, w, ch = images.shape
    index, frac, inside = jax.vmap(functools.partial(_warp_taps, h=h, w=w))(
        matrices.astype(jnp.float32), modes
    )
    flat = images.reshape(n, h * w, ch)
    taps = jnp.take_along_axis(flat, index.reshape(n, h * w * 4, 1), axis=1)
    taps = taps.reshape(n, h * w, 4, ch).astype(jnp.float32)
    v1, v2, v3, v4 = (taps[:, :, k] for k in range(4))
    t = frac[..., None]
    value = v2 + t * ((v3 - v1) + t * ((2.0 * (v1 - v2) + v3 - v4) + t * (v2 - v1 + v4 - v3)))
    value = jnp.clip(value, 0.0, 255.0).astype(jnp.uint8)
    out = jnp.where(inside[..., None], value, jnp.uint8(fill))
    return out.reshape(n, h, w, ch)


def _column(values: jax.Array, n: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(values, jnp.float32), (n,))


def shear_x_matrix(values: jax.Array, h: int, w: int) -> tuple[jax.Array, int]:
    """Output (x, y) reads (x + v·y, y), bicubic along x."""
    v = _column(values, values.shape[0])
    one, zero = jnp.ones_like(v), jnp.zeros_like(v)
    return jnp.stack([one, v, zero, zero, one, zero], -1), CUBIC_X


def shear_y_matrix(values: jax.Array, h: int, w: int) -> tuple[jax.Array, int]:
    """Output (x, y) reads (x, y + v·x), bicubic along y."""
    v = _column(values, values.shape[0])
    one, zero = jnp.ones_like(v), jnp.zeros_like(v)
    return jnp.stack([one, zero, zero, v, one, zero], -1), CUBIC_Y


def translate_x_matrix(values: jax.Array, h: int, w: int) -> tuple[jax.Array, int]:
    """Output (x, y) reads (x + v, y), nearest."""
    v = _column(values, values.shape[0])
    one, zero = jnp.ones_like(v), jnp.zeros_like(v)
    return jnp.stack([one, zero, v, zero, one, zero], -1), NEAREST


def translate_y_matrix(values: jax.Array, h: int, w: int) -> tuple[jax.Array, int]:
    """Output (x, y) reads (x, y + v), nearest."""
    v = _column(values, values.shape[0])
    one, zero = jnp.ones_like(v), jnp.zeros_like(v)
    return jnp.stack([one, zero, zero, zero, one, v], -1), NEAREST


def rotate_matrix(degrees: jax.Array, h: int, w: int) -> tuple[jax.Array, int]:
    """Pillow's ``rotate``: counter-clockwise about (w/2, h/2), nearest."""
    angle = -jnp.deg2rad(_column(degrees, degrees.shape[0]))
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return jnp.stack([cos, sin, c, -sin, cos, f], -1), NEAREST


WARP_PARAMS: dict[str, Callable[[jax.Array, int, int], tuple[jax.Array, int]]] = {
    "shearX": shear_x_matrix,
    "shearY": shear_y_matrix,
    "translateX": translate_x_matrix,
    "translateY": translate_y_matrix,
    "rotate": rotate_matrix,
}


# --------------------------------------------------------------------------- lookup tables


def apply_lut(images: jax.Array, luts: jax.Array) -> jax.Array:
    """out[n, y, x, c] = luts[n, c, images[n, y, x, c]], as Pillow's ``Image.point``."""
    n, h, w, ch = images.shape
    offsets = (jnp.arange(n)[:, None] * ch + jnp.arange(ch)[None, :]) * 256
    index = images.reshape(n, h * w, ch).astype(jnp.int32) + offsets[:, None, :]
    return luts.reshape(-1)[index].reshape(n, h, w, ch)


def _levels() -> jax.Array:
    return jnp.arange(256, dtype=jnp.int32)


def _per_image_lut(lut: jax.Array, ch: int) -> jax.Array:
    """(N, 256) → (N, C, 256) uint8: one table shared by the channels."""
    lut = jnp.clip(lut, 0, 255).astype(jnp.uint8)
    return jnp.broadcast_to(lut[:, None, :], (lut.shape[0], ch, 256))


def posterize_lut(images: jax.Array, bits: jax.Array) -> jax.Array:
    """ImageOps.posterize: keep the top ``bits`` bits (bits 8 is the identity)."""
    bits = jnp.round(_column(bits, images.shape[0])).astype(jnp.int32)
    mask = 255 - ((1 << (8 - bits)) - 1)
    return _per_image_lut(_levels()[None, :] & mask[:, None], images.shape[-1])


def solarize_lut(images: jax.Array, thresholds: jax.Array) -> jax.Array:
    """ImageOps.solarize: invert every value ≥ threshold."""
    threshold = _column(thresholds, images.shape[0])[:, None]
    levels = _levels()[None, :]
    return _per_image_lut(jnp.where(levels < threshold, levels, 255 - levels), images.shape[-1])


def invert_lut(images: jax.Array, values: jax.Array | None = None) -> jax.Array:
    """ImageOps.invert: 255 − x."""
    lut = jnp.broadcast_to(255 - _levels(), (images.shape[0], 256))
    return _per_image_lut(lut, images.shape[-1])


def channel_histograms(images: jax.Array) -> jax.Array:
    """(N, C, 256) int32 per-channel histograms, as Pillow's ``Image.histogram``."""
    n, h, w, ch = images.shape
    offsets = (jnp.arange(n)[:, None] * ch + jnp.arange(ch)[None, :]) * 256
    index = images.reshape(n, h * w, ch).astype(jnp.int32) + offsets[:, None, :]
    counts = jnp.zeros(n * ch * 256, jnp.int32).at[index.reshape(-1)].add(1)
    return counts.reshape(n, ch, 256)


@functools.cache
def _autocontrast_low_keys() -> np.ndarray:
    """Sorted keys (lo·256 + hi)·256 + i where Pillow's float64 ``int(i·scale + offset)``
    falls one below the exact 255·(i − lo) // (hi − lo) (at exact integers only)."""
    keys = []
    for span in range(1, 256):
        scale = 255.0 / span
        lo = np.arange(0, 256 - span, dtype=np.int64)[:, None]
        i = lo + np.arange(span + 1, dtype=np.int64)[None, :]
        pil = (i * scale + (-lo * scale)).astype(np.int64)
        low = pil < (255 * (i - lo)) // span
        lo_b, i_b = np.broadcast_to(lo, i.shape)[low], i[low]
        keys.append((lo_b * 256 + lo_b + span) * 256 + i_b)
    return np.sort(np.concatenate(keys)).astype(np.int32)


def autocontrast_lut(images: jax.Array, values: jax.Array | None = None) -> jax.Array:
    """ImageOps.autocontrast (cutoff 0): per channel, stretch min..max to 0..255."""
    lo = images.min(axis=(1, 2)).astype(jnp.int32)[..., None]
    hi = images.max(axis=(1, 2)).astype(jnp.int32)[..., None]
    levels = _levels()
    span = jnp.maximum(hi - lo, 1)
    lut = (255 * (levels - lo)) // span
    keys = (lo * 256 + hi) * 256 + levels
    table = jnp.asarray(_autocontrast_low_keys())
    pos = jnp.clip(jnp.searchsorted(table, keys), 0, table.shape[0] - 1)
    lut = lut - (table[pos] == keys).astype(jnp.int32)
    lut = jnp.where(hi > lo, jnp.clip(lut, 0, 255), levels)
    return lut.astype(jnp.uint8)


def equalize_lut(images: jax.Array, values: jax.Array | None = None) -> jax.Array:
    """ImageOps.equalize: step = (count − count of the last value) // 255, cumulative lut."""
    hist = channel_histograms(images)
    levels = _levels()
    last = jnp.max(jnp.where(hist > 0, levels, -1), axis=-1, keepdims=True)
    last_count = jnp.take_along_axis(hist, last, axis=-1)
    step = (hist.sum(-1, keepdims=True) - last_count) // 255
    before = jnp.cumsum(hist, axis=-1) - hist
    lut = (step // 2 + before) // jnp.maximum(step, 1)
    lut = jnp.where(step > 0, jnp.clip(lut, 0, 255), levels)
    return lut.astype(jnp.uint8)


LUT_PARAMS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "posterize": posterize_lut,
    "solarize": solarize_lut,
    "invert": invert_lut,
    "autocontrast": autocontrast_lut,
    "equalize": equalize_lut,
}


# --------------------------------------------------------------------------- blends


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a = hi + lo, each with at most 12 significant bits."""
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFFF000)
    hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return hi, a - hi


def rounded_product(a: jax.Array, x: jax.Array) -> jax.Array:
    """float32 a·x rounded once, as C computes it, for integer-valued |x| < 4096.

    XLA may fuse a multiply into the following add (FMA), which skips this rounding and
    moves results across the truncation that follows; both partial products here are exact,
    so their sum is the rounded product however the compiler fuses it.
    """
    hi, lo = _split(jnp.asarray(a, jnp.float32))
    return hi * x + lo * x


def blend(degenerate: jax.Array, images: jax.Array, factors: jax.Array) -> jax.Array:
    """Pillow's ``Image.blend(degenerate, image, factor)``: float32, truncated, clipped."""
    alpha = _column(factors, images.shape[0])[:, None, None, None]
    d = degenerate.astype(jnp.float32)
    value = d + rounded_product(alpha, images.astype(jnp.float32) - d)
    return jnp.clip(value, 0.0, 255.0).astype(jnp.uint8)


def luma(images: jax.Array) -> jax.Array:
    """Pillow's RGB → L: (19595 R + 38470 G + 7471 B + 2**15) >> 16, shape (N, H, W)."""
    x = images.astype(jnp.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def gray_degenerate(images: jax.Array) -> jax.Array:
    """ImageEnhance.Color: the L image back in RGB."""
    return jnp.broadcast_to(luma(images)[..., None], images.shape).astype(jnp.uint8)


def mean_degenerate(images: jax.Array) -> jax.Array:
    """ImageEnhance.Contrast: a flat image of int(mean(L) + 0.5)."""
    n, h, w, _ = images.shape
    total = luma(images).sum(axis=(1, 2))
    mean = (2 * total + h * w) // (2 * h * w)
    return jnp.broadcast_to(mean[:, None, None, None], images.shape).astype(jnp.uint8)


def black_degenerate(images: jax.Array) -> jax.Array:
    """ImageEnhance.Brightness: black."""
    return jnp.zeros_like(images)


def smooth_degenerate(images: jax.Array) -> jax.Array:
    """ImageEnhance.Sharpness: ImageFilter.SMOOTH in Pillow's float32 order, border kept."""
    x = images.astype(jnp.float32)
    k1, k5 = np.float32(1 / 13), np.float32(5 / 13)

    def row(r: jax.Array, centre: np.float32) -> jax.Array:
        left = rounded_product(k1, r[:, :, :-2])
        return left + rounded_product(centre, r[:, :, 1:-1]) + rounded_product(k1, r[:, :, 2:])

    total = 0.5 + row(x[:, 2:], k1)
    total = total + row(x[:, 1:-1], k5)
    total = total + row(x[:, :-2], k1)
    inner = jnp.clip(total, 0.0, 255.0).astype(jnp.uint8)
    return images.at[:, 1:-1, 1:-1].set(inner)


BLEND_DEGENERATES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "color": gray_degenerate,
    "contrast": mean_degenerate,
    "brightness": black_degenerate,
    "sharpness": smooth_degenerate,
}


# --------------------------------------------------------------------------- ops by name


def _batched_op(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The op on a batch (N, H, W, 3) with one value per image, through its primitive."""

    def op(images: jax.Array, values: jax.Array) -> jax.Array:
        n, h, w, _ = images.shape
        values = _column(values, n)
        if name in WARP_PARAMS:
            matrices, mode = WARP_PARAMS[name](values, h, w)
            return affine_warp(images, matrices, jnp.full((n,), mode, jnp.int32))
        if name in LUT_PARAMS:
            return apply_lut(images, LUT_PARAMS[name](images, values))
        return blend(BLEND_DEGENERATES[name](images), images, values)

    return op


def _single_op(name: str) -> Callable[[jax.Array, ArrayLike], jax.Array]:
    batched = _batched_op(name)

    def op(image: jax.Array, value: ArrayLike = 0.0) -> jax.Array:
        return batched(jnp.asarray(image)[None], jnp.reshape(jnp.asarray(value), (1,)))[0]

    op.__name__ = name
    op.__doc__ = f"AutoAugment's {name} on one uint8 (H, W, 3) image; value already mapped."
    return op


OPS: dict[str, Callable[[jax.Array, ArrayLike], jax.Array]] = {
    name: _single_op(name) for name in OP_NAMES
}
BATCHED_OPS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    name: _batched_op(name) for name in OP_NAMES
}


# --------------------------------------------------------------------------- policy stage


def _select(masks: Sequence[tuple[jax.Array, jax.Array]], default: jax.Array) -> jax.Array:
    """Per image, the value whose mask is set (else ``default``)."""
    out = default
    for mask, value in masks:
        out = jnp.where(mask.reshape((-1,) + (1,) * (value.ndim - 1)), value, out)
    return out


def apply_stage(
    images: jax.Array,
    op_names: Sequence[str],
    op_index: jax.Array,
    values: jax.Array,
    fired: jax.Array,
) -> jax.Array:
    """One policy stage on a batch: image i gets ``op_names[op_index[i]]`` with ``values[i]``
    if ``fired[i]``, else is left alone.

    Each image has at most one non-identity primitive, so the batch goes through one warp,
    one lookup table and one blend, each with identity parameters for the images whose op
    is of another kind. Parameters come from the stage input, which is what the op sees.
    """
    n, h, w, ch = images.shape
    values = values.astype(jnp.float32)
    masks = {}
    for j, name in enumerate(op_names):
        if name not in OPS:
            raise ValueError(f"unknown AutoAugment op {name!r}; expected one of {OP_NAMES}")
        hit = fired & (op_index == j)
        masks[name] = masks[name] | hit if name in masks else hit

    out = images
    warps = [(masks[name], *WARP_PARAMS[name](values, h, w)) for name in WARP_OPS if name in masks]
    if warps:
        identity = jnp.broadcast_to(jnp.asarray(_IDENTITY_MATRIX, jnp.float32), (n, 6))
        matrices = _select([(mask, m) for mask, m, _ in warps], identity)
        modes = jnp.full((n,), NEAREST, jnp.int32)
        modes = _select([(mask, jnp.full((n,), mode, jnp.int32)) for mask, _, mode in warps], modes)
        out = affine_warp(out, matrices, modes)
    luts = [(masks[name], LUT_PARAMS[name](images, values)) for name in LUT_OPS if name in masks]
    if luts:
        identity = jnp.broadcast_to(jnp.arange(256, dtype=jnp.uint8), (n, ch, 256))
        out = apply_lut(out, _select(luts, identity))
    blends = [(masks[name], BLEND_DEGENERATES[name](images)) for name in BLEND_OPS if name in masks]
    if blends:
        is_blend = functools.reduce(jnp.logical_or, [mask for mask, _ in blends])
        factors = jnp.where(is_blend, values, 1.0)
        out = blend(_select(blends, blends[0][1]), out, factors)
    return out
