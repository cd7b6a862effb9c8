"""The real code paths in minutes on a CPU: a small MicroNet on a few hundred CIFAR-10 images.

`--config=configs/smoke.py` trains stage A; `--config=configs/smoke.py:pipeline` runs every
stage of the recipe with epoch counts scaled down.
"""

from pathlib import Path

from micronet_jax.config.defaults import default_config

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def get_config(variant: str = "") -> object:
    config = default_config()
    config.seed = 0
    config.model.block_strings = (
        "r1_k3_s1_e1_i16_o16_se0.25",
        "r1_k3_s2_e4_i16_o24_se0.25",
        "r1_k3_s1_e4_i24_o24_se0.25",
    )
    config.model.width = 1.0
    config.model.resolution = 1.0
    config.model.head_filters = 64
    config.model.exit_block = 1

    config.data.name = "cifar10"
    config.data.dir = str(SHARED_DATA) if SHARED_DATA.exists() else ""
    config.data.num_train = 512
    config.data.num_test = 256

    config.train.epochs = 4
    config.train.batch_size = 64
    config.train.eval_every = 2
    config.train.checkpoint_every = 1
    config.train.eval_batch_size = 128
    if variant == "pipeline":
        config.mode = "pipeline"
        config.pipeline.epoch_scale = 1 / 600  # baseline 2 epochs, each round 1, exit 1
        config.pipeline.exit_prune_targets = (25.0, 50.0)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of smoke.py (known: pipeline)")
    return config
