"""A tiny run for tests: 3 small blocks, a generated archive, a few epochs of a few batches.

Pass the data with `--config.data.dir=ARCHIVE` (tests build one with tests/archives.py).
`tiny.py:pipeline` runs every stage kind with one epoch each.
"""

from micronet_jax.config.defaults import default_config


def get_config(variant: str = ""):
    config = default_config()
    config.model.block_strings = (
        "r1_k3_s1_e1_i8_o8_se0.25",
        "r1_k3_s2_e2_i8_o16_se0.25",
        "r1_k3_s1_e2_i16_o16_se0.25",
    )
    config.model.width = 1.0
    config.model.resolution = 1.0
    config.model.head_filters = 32
    config.model.exit_block = 1
    config.data.name = "cifar10"
    config.data.download = False
    config.train.epochs = 4
    config.train.batch_size = 32
    config.train.eval_every = 1
    config.train.checkpoint_every = 1
    config.train.eval_batch_size = 32
    config.train.progress = False
    if variant == "pipeline":
        # every stage runs 1 epoch; without AutoAugment, which compiles slowly on a CPU and
        # is run by the stage-A tests (tiny.py) and the augmentation tests
        config.mode = "pipeline"
        config.data.autoaugment = False
        config.pipeline.exit_autoaugment = False
        config.pipeline.epoch_scale = 1 / 1200
        config.pipeline.prune_targets = (30.0, 60.0)
        config.pipeline.exit_prune_targets = (50.0,)
    elif variant == "quantized":  # baseline, a pruning round, exit head, quantize (4/8 bits)
        config.mode = "pipeline"
        config.data.autoaugment = False
        config.pipeline.exit_autoaugment = False
        config.pipeline.epoch_scale = 1 / 1200
        config.pipeline.prune_targets = (50.0,)
        config.quant.weight_bits, config.quant.activation_bits = 4, 8
        config.quant.epochs = 2400  # 2 epochs
        config.quant.calibration_images = 64
    return config
