"""Evaluate and score a checkpoint: a finished workdir or one of the original's `.pth` files.

python -m micronet_jax.main --config=configs/test.py \
    --config.checkpoint=PATH [--config.data.dir=DIR]
"""

from micronet_jax.defaults import default_config


def get_config():
    config = default_config()
    config.mode = "test"
    return config
