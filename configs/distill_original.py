"""Quantise the original's final checkpoint by distillation from its own float32 self.

    python -m micronet_jax.main --config=configs/distill_original.py --workdir=runs/distill \\
        [--config.checkpoint=PATH/final_ee50/trained_model.pth] [--config.data.dir=DIR]

The check available without CIFAR-100: the quantize stage (mode=quantize) starts from the
converted released network, and learns to match its float32 predictions (soft targets, both
heads; no labels needed) on CIFAR-10 training images with the recipe's augmentation, for a
few epochs a CPU can run. The report gives each path's top-1 agreement with the float32
network on the CIFAR-10 test images and the honest score at the chosen widths. Variants:
`:8x8` (the default), `:4x8`, `:4x4`, `:4x4keep` (4 bits, the stem's input and the
classifier at 8, as the track's winner kept its first and last layers wider).
"""

from pathlib import Path

from micronet_jax.config.defaults import default_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FINAL = SHARED / "reference" / "osi_ai" / "final_ee50" / "trained_model.pth"
DATA = SHARED / "data" / "cifar-10-python.tar.gz"
VARIANTS = {
    "8x8": (8, 8, ()),
    "4x8": (4, 8, ()),
    "4x4": (4, 4, ()),
    "4x4keep": (4, 4, ("stem_conv=8,8", "fc=8,8", "exit_head/fc=8,8")),
}


def get_config(variant: str = "8x8"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of distill_original.py: {list(VARIANTS)}")
    config = default_config()
    config.mode = "quantize"
    config.checkpoint = str(FINAL) if FINAL.exists() else ""
    config.data.name = "cifar10"
    config.data.dir = str(DATA) if DATA.exists() else ""
    config.model.num_classes = 100  # the released network's classes, not the data's
    config.model.exit_block = 4
    weights, activations, keep = VARIANTS[variant]
    config.quant.weight_bits, config.quant.activation_bits = weights, activations
    config.quant.keep = keep
    config.quant.distill = True
    config.quant.freeze_bn = True  # CIFAR-10's batch statistics are not the network's
    # BN frozen, the network no longer normalises away its weights' scale: 0.01 wrecked it
    # (5% agreement after 50 steps); 0.002 learns
    config.quant.lr = 0.002
    config.quant.epochs = 2
    config.data.num_train = 3_200  # 2 epochs of 25 steps: about 15 minutes on 2 CPU cores
    config.quant.calibration_images = 1000
    config.train.eval_every = 2  # the 10,000 test images once, at the end
    config.train.checkpoint_every = 1
    config.train.eval_batch_size = 500
    return config
