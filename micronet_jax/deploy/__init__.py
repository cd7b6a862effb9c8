"""The network for other runtimes: ONNX graphs (float32 and quantised) and the export
library behind `python -m micronet_jax.export`."""
