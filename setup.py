"""Install micronet_jax: `pip install -e .` (extras: test, bench, export, tflite, experiments,
tfds, cuda, tpu)."""

from setuptools import find_packages, setup

setup(
    name="micronet_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of the OSI AI MicroNet Challenge entry (CIFAR-100).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11,<3.14",
    packages=find_packages(include=["micronet_jax", "micronet_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml_collections>=1.1.0",
        "absl-py",
        "numpy",
        "tqdm",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "pillow",
            "ruff",
            "optuna",
            "matplotlib",
            "nbclient",
            "nbformat",
            "ipykernel",
            "qwix",
            "onnx>=1.17",
            "onnxruntime>=1.20",
            "jax2onnx>=0.13,<0.14",
            "openvino>=2025.0",
            "ai-edge-litert>=2.0",
            "tensorflow-datasets>=4.9",
            "array-record>=0.5",
        ],
        "export": [
            "onnx>=1.17",
            "onnxruntime>=1.20",
            "jax2onnx>=0.13,<0.14",
            "openvino>=2025.0",
            "ai-edge-litert>=2.0",
        ],
        # converting to .tflite (running one needs only ai-edge-litert, in `export`)
        "tflite": ["tensorflow-cpu>=2.21"],
        "experiments": ["optuna", "matplotlib"],
        "bench": ["torch==2.13.0", "pillow"],
        # what reading a prepared TFDS data set needs: TFDS, its image decoder (Pillow) and
        # the array_record reader; TFRecord data is read through TensorFlow (Colab has it;
        # elsewhere `pip install tensorflow`, or the `tflite` extra's tensorflow-cpu)
        "tfds": ["tensorflow-datasets>=4.9", "array-record>=0.5", "pillow"],
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
)
