"""Searches and sweeps around the recipe: AutoAugment, architecture, scaling, exit position."""
