"""The public API: every name `micronet_jax` exports imports, is what its home module
defines, and `import micronet_jax` alone loads no JAX (a notebook can still choose the CPU
devices first)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import micronet_jax


@pytest.mark.parametrize("name", micronet_jax.__all__)
def test_every_exported_name_imports(name):
    value = getattr(micronet_jax, name)
    exec(f"from micronet_jax import {name}", {})  # the form a notebook uses
    home = micronet_jax.API.get(name)
    if home is not None:
        assert value is getattr(importlib.import_module(f"micronet_jax.{home}"), name)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        micronet_jax.nope  # noqa: B018


def test_the_exports_cover_each_part_of_the_package():
    homes = {module.split(".")[0] for module in micronet_jax.API.values()}
    assert {"models", "data", "train", "scoring", "quant", "evaluation", "recipe"} <= homes


def test_importing_the_package_loads_no_jax():
    code = "import sys, micronet_jax; print('jax' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_use_cpu_cores_from_the_top_runs_before_the_backend_starts():
    code = (
        "import micronet_jax\n"
        "micronet_jax.use_cpu_cores(3)\n"
        "import jax\n"
        "print(len(jax.devices('cpu')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"
