"""The configuration: defaults, checks before any compilation, config -> architecture /
model / data, and what a workdir remembers of the config that started it."""
