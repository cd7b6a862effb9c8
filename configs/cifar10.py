"""The recipe on CIFAR-10 (10 classes; everything else as on CIFAR-100)."""

from micronet_jax.config.defaults import default_config


def get_config(variant: str = ""):
    config = default_config()
    config.data.name = "cifar10"
    if variant == "pipeline":
        config.mode = "pipeline"
    return config
