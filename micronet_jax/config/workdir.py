"""A run directory's memory of the config that started it.

`record_config` writes `workdir/config.json` once the data has loaded; `check_resume`
refuses to continue a workdir that was started with a different recipe (unless
`force_restart`, which moves the old contents aside). Shared by the training loop and the
pipeline, so it sits below both.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from micronet_jax.config.defaults import default_config
from micronet_jax.errors import ConfigError

CONFIG_FILE = "config.json"

# Keys whose change makes a workdir's checkpoints mean something else. Not listed (free to
# change on resume): progress bars, eval/checkpoint frequency, kept checkpoints, eval batch
# size, cache and data paths, download, nan checking and fault injection, force_restart.
RECIPE_KEYS = (
    "mode",
    "seed",
    "model.*",
    "data.name",
    "data.num_train",
    "data.num_test",
    "data.autoaugment",
    "data.policy",
    "data.mixup_alpha",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.momentum",
    "train.weight_decay",
    "train.label_smoothing",
    "train.drop_last",
    "train.nan_policy",
    "pipeline.*",
    "quant.*",
)


def recipe_of(config: Any) -> dict[str, Any]:
    """The flattened values of RECIPE_KEYS (JSON types, so they compare with config.json)."""
    return recipe_of_json(json.loads(config.to_json()))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


ABSENT = "<absent>"


def differences(
    old: dict[str, Any],
    new: dict[str, Any],
    joiner: str = " -> ",
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """'key: old<joiner>new' for every key of two flattened configs whose values differ. A
    key `old` lacks reads as its value in `defaults` (a workdir started before the key
    existed), else as absent."""
    defaults = defaults or {}
    return [
        f"{k}: {old.get(k, ABSENT)!r}{joiner}{new.get(k, ABSENT)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k, defaults.get(k, ABSENT)) != new.get(k, ABSENT)
    ]


def _saved_recipe(workdir: Path) -> dict[str, Any] | None:
    path = workdir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return recipe_of_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{path} is unreadable ({exc}); pass --config.force_restart=True to start over"
        ) from None


def recipe_of_json(saved: dict[str, Any]) -> dict[str, Any]:
    """The RECIPE_KEYS entries of a config read back from JSON, flattened."""
    flat = flatten(saved)
    return {
        k: v
        for k, v in flat.items()
        if any(k == p or (p.endswith(".*") and k.startswith(p[:-1])) for p in RECIPE_KEYS)
    }


def check_resume(config: Any, workdir: str | Path | None) -> None:
    """Refuse a workdir started with another recipe (unless force_restart); read-only."""
    if not workdir or config.mode == "test" or config.force_restart:
        return
    old = _saved_recipe(Path(workdir))
    if old is None:
        return
    diffs = differences(old, recipe_of(config), defaults=recipe_of(default_config()))
    if diffs:
        raise ConfigError(
            f"{workdir} was started with another config; differing keys (old -> new): "
            + "; ".join(diffs)
            + ". Use the old values, another --workdir, or --config.force_restart=True "
            "(moves the old contents to .old-<timestamp>/)"
        )


def move_aside(workdir: Path) -> Path | None:
    """Move everything in `workdir` (but earlier .old-* folders) to workdir/.old-<time>/."""
    entries = [p for p in workdir.iterdir() if not p.name.startswith(".old-")]
    if not entries:
        return None
    target = workdir / time.strftime(".old-%Y%m%d-%H%M%S")
    suffix = 0
    while target.exists():
        suffix += 1
        target = workdir / (time.strftime(".old-%Y%m%d-%H%M%S") + f"-{suffix}")
    target.mkdir()
    for entry in entries:
        shutil.move(str(entry), target / entry.name)
    return target


def record_config(config: Any, workdir: str | Path) -> None:
    """After the data loaded: on force_restart move old contents aside, then write
    config.json (first run) so that later runs can be compared with it."""
    workdir = Path(workdir)
    if config.force_restart and workdir.exists():
        moved = move_aside(workdir)
        if moved is not None:
            print(f"force_restart: moved the old contents of {workdir} to {moved}")
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    if path.exists() and not config.force_restart:
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json(indent=2, sort_keys=True))
    tmp.replace(path)
