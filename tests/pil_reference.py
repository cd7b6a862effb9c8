"""The original's per-image augmentation with PIL: the reference the JAX code is tested against.

The original (AutoAugment for CIFAR, PyTorch data loaders) applied each op to one PIL image
with a random sign drawn per call. Here the sign is an argument, so a test can ask for the
same value as the JAX op. `RANGES` and `op_value` repeat the original's magnitude arithmetic.
"""

from __future__ import annotations

import functools
import pickle
import random
import tarfile

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

FILLCOLOR = (128, 128, 128)
AFFINE = Image.Transform.AFFINE
BICUBIC = Image.Resampling.BICUBIC
CIFAR100_MEAN = np.array([0.5071, 0.4867, 0.4408], np.float32)
CIFAR100_STD = np.array([0.2675, 0.2565, 0.2761], np.float32)

RANGES = {
    "shearX": np.linspace(0, 0.3, 10),
    "shearY": np.linspace(0, 0.3, 10),
    "translateX": np.linspace(0, 150 / 331, 10),
    "translateY": np.linspace(0, 150 / 331, 10),
    "rotate": np.linspace(0, 30, 10),
    "color": np.linspace(0.0, 0.9, 10),
    "posterize": np.round(np.linspace(8, 4, 10), 0).astype(int),
    "solarize": np.linspace(256, 0, 10),
    "contrast": np.linspace(0.0, 0.9, 10),
    "sharpness": np.linspace(0.0, 0.9, 10),
    "brightness": np.linspace(0.0, 0.9, 10),
    "autocontrast": [0] * 10,
    "equalize": [0] * 10,
    "invert": [0] * 10,
}


def rotate_with_fill(img: Image.Image, degrees: float) -> Image.Image:
    """The original's rotate: RGBA rotate (nearest), composited over gray."""
    rot = img.convert("RGBA").rotate(degrees)
    return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(img.mode)


OPS = {
    "shearX": lambda img, v: img.transform(
        img.size, AFFINE, (1, v, 0, 0, 1, 0), BICUBIC, fillcolor=FILLCOLOR
    ),
    "shearY": lambda img, v: img.transform(
        img.size, AFFINE, (1, 0, 0, v, 1, 0), BICUBIC, fillcolor=FILLCOLOR
    ),
    "translateX": lambda img, v: img.transform(
        img.size, AFFINE, (1, 0, v, 0, 1, 0), fillcolor=FILLCOLOR
    ),
    "translateY": lambda img, v: img.transform(
        img.size, AFFINE, (1, 0, 0, 0, 1, v), fillcolor=FILLCOLOR
    ),
    "rotate": rotate_with_fill,
    "color": lambda img, v: ImageEnhance.Color(img).enhance(v),
    "posterize": lambda img, v: ImageOps.posterize(img, int(v)),
    "solarize": lambda img, v: ImageOps.solarize(img, v),
    "contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(v),
    "sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(v),
    "brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(v),
    "autocontrast": lambda img, v: ImageOps.autocontrast(img),
    "equalize": lambda img, v: ImageOps.equalize(img),
    "invert": lambda img, v: ImageOps.invert(img),
}


def op_value(name: str, magnitude: int, sign: int, size: tuple[int, int] = (32, 32)) -> float:
    """The value the original handed to PIL for (op, magnitude index, random sign)."""
    m = RANGES[name][magnitude]
    if name == "translateX":
        return m * size[0] * sign
    if name == "translateY":
        return m * size[1] * sign
    if name in ("shearX", "shearY"):
        return m * sign
    if name in ("color", "contrast", "sharpness", "brightness"):
        return 1 + m * sign
    return m


def apply_op(name: str, image: np.ndarray, value: float) -> np.ndarray:
    """One op on one uint8 (H, W, 3) array, through PIL."""
    return np.asarray(OPS[name](Image.fromarray(image), value))


def apply_subpolicy(img: Image.Image, row, rng: random.Random) -> Image.Image:
    """The original's SubPolicy.__call__: op1 with p1, then op2 with p2, random signs."""
    op1, p1, m1, op2, p2, m2 = row
    if rng.random() < p1:
        img = OPS[op1](img, op_value(op1, m1, rng.choice([-1, 1]), img.size))
    if rng.random() < p2:
        img = OPS[op2](img, op_value(op2, m2, rng.choice([-1, 1]), img.size))
    return img


def train_transform(image: np.ndarray, rows, rng: random.Random) -> np.ndarray:
    """AutoAugment → random crop 32 (zero padding 4) → flip p 0.5 → normalise, per image."""
    img = Image.fromarray(image)
    img = apply_subpolicy(img, rows[rng.randint(0, len(rows) - 1)], rng)
    x = np.asarray(img)
    h, w, _ = x.shape
    padded = np.zeros((h + 8, w + 8, 3), np.uint8)
    padded[4 : 4 + h, 4 : 4 + w] = x
    top, left = rng.randint(0, 8), rng.randint(0, 8)
    x = padded[top : top + h, left : left + w]
    if rng.random() < 0.5:
        x = x[:, ::-1]
    return (x.astype(np.float32) / 255.0 - CIFAR100_MEAN) / CIFAR100_STD


def train_batch(images: np.ndarray, labels: np.ndarray, rows, rng: random.Random):
    """The original's way for one batch: per-image PIL, then mixup (α = 1) in numpy."""
    x = np.stack([train_transform(image, rows, rng) for image in images])
    lam = rng.betavariate(1.0, 1.0)
    index = np.random.default_rng(rng.getrandbits(32)).permutation(len(x))
    return lam * x + (1 - lam) * x[index], labels, labels[index], lam


@functools.cache
def cifar10_test_images(archive: str, n: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` CIFAR-10 test images (N, 32, 32, 3) uint8 and labels; read once."""
    with tarfile.open(archive) as tar:
        data = pickle.load(tar.extractfile("cifar-10-batches-py/test_batch"), encoding="bytes")
    images = np.ascontiguousarray(data[b"data"][:n].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels = np.asarray(data[b"labels"][:n], np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels
