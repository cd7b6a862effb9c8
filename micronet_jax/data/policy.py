"""The CIFAR-100 AutoAugment policy as data, its magnitude tables, and its batched application.

A policy is a list of sub-policies (op1, p1, m1, op2, p2, m2). Per image one sub-policy is
picked uniformly; op1 fires with probability p1, then op2 with p2, each with the value at
magnitude index m (0..9) and, for signed ops, a random sign. `apply_policy` draws all of it
from one `jax.random` key and applies each stage to the whole batch at once
(`autoaugment.apply_stage`). A searched policy can be given as rows instead of the default.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax.data import autoaugment
from micronet_jax.errors import ConfigError

Row = tuple[str, float, int, str, float, int]

# The original's searched policy for CIFAR-100: (op1, p1, m1, op2, p2, m2).
CIFAR100_ROWS: tuple[Row, ...] = (
    ("solarize", 0.9879223132161143, 1, "rotate", 0.03867356636118723, 8),
    ("autocontrast", 0.5906539642621361, 2, "shearX", 0.07767828867074882, 9),
    ("contrast", 0.18063692212392612, 3, "translateY", 0.6762460359799197, 1),
    ("posterize", 0.4677780879889155, 0, "contrast", 0.550614549256463, 2),
    ("solarize", 0.793757777553684, 4, "shearY", 0.3124766163048942, 2),
    ("translateY", 0.34171542012733713, 8, "sharpness", 0.2643456363603939, 5),
    ("shearX", 0.648144686446862, 5, "shearY", 0.20297188174717734, 9),
    ("color", 0.11474619948856418, 3, "autocontrast", 0.9131733124811067, 6),
    ("shearY", 0.4558313172485038, 0, "brightness", 0.8892801924496353, 5),
    ("translateX", 0.9958622271521873, 1, "solarize", 0.5779051595097715, 6),
    ("sharpness", 0.4200533622250595, 5, "brightness", 0.5383153544721851, 4),
    ("shearY", 0.6409842804847393, 7, "autocontrast", 0.5017245915965498, 4),
    ("translateX", 0.6462913003816162, 4, "solarize", 0.27375024179538526, 4),
    ("translateX", 0.932342104383339, 5, "sharpness", 0.7433929014413744, 2),
    ("invert", 0.557597831322841, 4, "brightness", 0.22304480845915514, 4),
    ("color", 0.539726520644713, 4, "equalize", 0.47647885461108325, 6),
    ("shearY", 0.6939536342980013, 4, "color", 0.5242956429052371, 4),
    ("solarize", 0.6018510250803771, 1, "shearY", 0.39765403790818454, 7),
    ("equalize", 0.9533833283616566, 8, "equalize", 0.364953764116815, 6),
    ("translateX", 0.1889691085868327, 3, "sharpness", 0.5526677051817206, 0),
    ("shearX", 0.9785734237426628, 4, "rotate", 0.30821508771473094, 7),
    ("contrast", 0.46711128198273516, 8, "translateY", 0.5407062800240695, 9),
    ("shearY", 0.13242120490788128, 9, "brightness", 0.5510846119055629, 6),
    ("rotate", 0.3967473536322406, 3, "posterize", 0.9257903359125218, 1),
    ("contrast", 0.787739760044718, 7, "invert", 0.06780952440551483, 8),
)

NUM_MAGNITUDES = 10

# Value at magnitude index m, before the sign (the original's `ranges`).
MAGNITUDES: dict[str, np.ndarray] = {
    "shearX": np.linspace(0, 0.3, NUM_MAGNITUDES),
    "shearY": np.linspace(0, 0.3, NUM_MAGNITUDES),
    "translateX": np.linspace(0, 150 / 331, NUM_MAGNITUDES),
    "translateY": np.linspace(0, 150 / 331, NUM_MAGNITUDES),
    "rotate": np.linspace(0, 30, NUM_MAGNITUDES),
    "color": np.linspace(0.0, 0.9, NUM_MAGNITUDES),
    "contrast": np.linspace(0.0, 0.9, NUM_MAGNITUDES),
    "brightness": np.linspace(0.0, 0.9, NUM_MAGNITUDES),
    "sharpness": np.linspace(0.0, 0.9, NUM_MAGNITUDES),
    "posterize": np.round(np.linspace(8, 4, NUM_MAGNITUDES), 0).astype(int),
    "solarize": np.linspace(256, 0, NUM_MAGNITUDES),
    "autocontrast": np.zeros(NUM_MAGNITUDES),
    "equalize": np.zeros(NUM_MAGNITUDES),
    "invert": np.zeros(NUM_MAGNITUDES),
}
SIGNED_OPS = frozenset(
    {"shearX", "shearY", "translateX", "translateY", "color", "contrast", "brightness", "sharpness"}
)


def op_value(name: str, magnitude: int, negative: bool, height: int, width: int) -> float:
    """The value the original handed to PIL, with its float64 arithmetic.

    Translations scale by the image size; enhance factors are 1 ± m; others are m itself.
    """
    m = MAGNITUDES[name][magnitude]
    sign = -1 if negative and name in SIGNED_OPS else 1
    if name == "translateX":
        return float(m * width * sign)
    if name == "translateY":
        return float(m * height * sign)
    if name in ("color", "contrast", "brightness", "sharpness"):
        return float(1 + m * sign)
    return float(m * sign)


def _validate_row(index: int, row: Sequence) -> Row:
    """A row as (op1, p1, m1, op2, p2, m2), or ConfigError naming what is wrong."""
    where = f"AutoAugment policy row {index} {tuple(row)!r}"
    if isinstance(row, str) or not isinstance(row, Sequence) or len(row) != 6:
        raise ConfigError(f"{where}: expected 6 fields (op1, p1, m1, op2, p2, m2)")
    out = []
    for k in (0, 3):
        name, prob, mag = row[k], row[k + 1], row[k + 2]
        if name not in autoaugment.OPS:
            raise ConfigError(
                f"{where}: unknown op {name!r}; expected one of {sorted(autoaugment.OPS)}"
            )
        if isinstance(prob, bool) or not isinstance(prob, numbers.Real) or not 0 <= prob <= 1:
            raise ConfigError(f"{where}: probability {prob!r} is not in [0, 1]")
        if (
            isinstance(mag, bool)
            or not isinstance(mag, numbers.Integral)
            or not 0 <= mag < NUM_MAGNITUDES
        ):
            raise ConfigError(f"{where}: magnitude {mag!r} is not an integer in 0..9")
        out += [str(name), float(prob), int(mag)]
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Validated sub-policies; hashable, so it can be a static argument of a jitted function."""

    rows: tuple[Row, ...]

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence]) -> Policy:
        """Validate rows (op1, p1, m1, op2, p2, m2); raise ConfigError on the first bad one."""
        if isinstance(rows, Policy):
            return rows
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
            raise ConfigError(f"AutoAugment policy {rows!r}: expected a list of rows")
        if len(rows) == 0:
            raise ConfigError("AutoAugment policy is empty; expected at least one sub-policy")
        return cls(tuple(_validate_row(i, row) for i, row in enumerate(rows)))

    def __len__(self) -> int:
        return len(self.rows)

    def stage_ops(self, stage: int) -> tuple[str, ...]:
        """The distinct op names of stage 0 (op1) or 1 (op2), in first-seen order."""
        return tuple(dict.fromkeys(row[3 * stage] for row in self.rows))

    def probabilities(self) -> np.ndarray:
        """(rows, 2) firing probabilities."""
        return np.array([(row[1], row[4]) for row in self.rows], np.float32)

    def values(self, height: int, width: int) -> np.ndarray:
        """(rows, 2 stages, 2 signs) float32 op values; sign index 1 is the negative sign."""
        return np.array(
            [
                [
                    [op_value(row[3 * s], row[3 * s + 2], neg, height, width) for neg in (0, 1)]
                    for s in (0, 1)
                ]
                for row in self.rows
            ],
            np.float32,
        )


CIFAR100_POLICY = Policy.from_rows(CIFAR100_ROWS)


def load_policy(path: str) -> tuple[Row, ...] | None:
    """None (the CIFAR-100 policy) for an empty path, else the rows of a JSON policy file as
    a hashable tuple (a jitted step closes over it)."""
    if not path:
        return None
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"data.policy {path!r} is not a readable JSON policy: {exc}") from None
    return tuple(tuple(row) for row in rows)


class Decisions(NamedTuple):
    """The random choices of one batch: which sub-policy, which ops fire, which signs."""

    subpolicy: jax.Array  # (n,) int32 in [0, len(policy))
    fire: jax.Array  # (n, 2) bool: op1, op2 applied
    negative: jax.Array  # (n, 2) bool: the op's value takes the negative sign


def _as_policy(policy: Policy | Sequence[Sequence] | None) -> Policy:
    return CIFAR100_POLICY if policy is None else Policy.from_rows(policy)


def sample_policy_decisions(
    key: jax.Array, n: int, policy: Policy | Sequence[Sequence] | None = None
) -> Decisions:
    """Draw the sub-policy, firing and sign of every op for ``n`` images."""
    policy = _as_policy(policy)
    k_sub, k_fire, k_sign = jax.random.split(key, 3)
    subpolicy = jax.random.randint(k_sub, (n,), 0, len(policy), dtype=jnp.int32)
    probs = jnp.asarray(policy.probabilities())[subpolicy]
    fire = jax.random.uniform(k_fire, (n, 2)) < probs
    negative = jax.random.bernoulli(k_sign, 0.5, (n, 2))
    return Decisions(subpolicy, fire, negative)


def stage_capacities(policy: Policy, n: int, stage: int) -> dict[str, int]:
    """Batch sizes of the passes of ``stage``, per op kind and per image-dependent table op
    (see `autoaugment.capacity_for`), from the probability that an image needs each."""
    probs: dict[str, float] = {}
    for row in policy.rows:
        name, p = row[3 * stage], row[3 * stage + 1] / len(policy)
        for key in (autoaugment.KINDS[name], name):
            probs[key] = probs.get(key, 0.0) + p
    return {
        key: autoaugment.capacity_for(n, min(p, 1.0))
        for key, p in probs.items()
        if key in ("warp", "lut", "blend") or key in autoaugment.IMAGE_LUTS
    }


def apply_decisions_planar(
    images: jax.Array, decisions: Decisions, policy: Policy | Sequence[Sequence] | None = None
) -> jax.Array:
    """Apply given decisions to a planar uint8 batch (N, C, H, W): op1 stage, op2 stage."""
    policy = _as_policy(policy)
    n, _, h, w = images.shape
    values = jnp.asarray(policy.values(h, w))
    sub = decisions.subpolicy
    for stage in (0, 1):
        names = policy.stage_ops(stage)
        local = jnp.asarray([names.index(row[3 * stage]) for row in policy.rows], jnp.int32)
        stage_values = values[sub, stage, decisions.negative[:, stage].astype(jnp.int32)]
        images = autoaugment.apply_stage(
            images,
            names,
            local[sub],
            stage_values,
            decisions.fire[:, stage],
            stage_capacities(policy, n, stage),
        )
    return images


def apply_policy_planar(
    key: jax.Array, images: jax.Array, policy: Policy | Sequence[Sequence] | None = None
) -> jax.Array:
    """`apply_policy` on a planar batch (N, C, H, W), the layout the ops run in."""
    policy = _as_policy(policy)
    decisions = sample_policy_decisions(key, images.shape[0], policy)
    return apply_decisions_planar(images, decisions, policy)


def apply_policy(
    key: jax.Array, images: jax.Array, policy: Policy | Sequence[Sequence] | None = None
) -> jax.Array:
    """AutoAugment a uint8 batch (N, H, W, 3) with ``policy`` (default: CIFAR-100's)."""
    planar = apply_policy_planar(key, autoaugment.to_planar(images), policy)
    return autoaugment.from_planar(planar)
