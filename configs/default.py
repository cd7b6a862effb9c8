"""Stage A of the recipe: the dense baseline, 1200 epochs on CIFAR-100."""

from micronet_jax.config.defaults import default_config


def get_config():
    return default_config()
