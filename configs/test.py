"""Evaluate and score a checkpoint: a finished workdir or one of the original's `.pth` files.

python -m micronet_jax.main --config=configs/test.py \
    --config.checkpoint=PATH [--config.data.dir=DIR]
"""

from micronet_jax.config.defaults import default_config


def get_config():
    config = default_config()
    config.mode = "test"
    config.cpu_devices = 0  # on a CPU, each core evaluates its own share of every batch
    # a multiple of bn_splits x devices (the batch check) for up to 128 cores
    config.train.eval_batch_size = 512
    return config
