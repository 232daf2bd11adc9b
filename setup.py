"""r1jax: a JAX-native research reimplementation of DeepSeek-R1 (model + recipe)."""
import setuptools

setuptools.setup(
    name="r1jax",
    version="0.1.0",
    description="DeepSeek-V3 architecture and the DeepSeek-R1 GRPO recipe in pure JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # configs/ ships as the top-level namespace package `configs` (no __init__.py), so
    # `from configs import r1_tiny` reads the same from a checkout and from an installed
    # wheel (colab/r1_tiny.ipynb runs both ways). Configs are code that imports r1jax, and
    # config files are also passed by path (`--config=configs/r1_tiny.py`), so they stay
    # beside the package rather than moving into it under a second name.
    packages=[*setuptools.find_packages(include=["r1jax", "r1jax.*", "pallas_kernels",
                                                 "pallas_kernels.*"]), "configs"],
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "numpy>=1.26",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "safetensors>=0.4",
        "math-verify>=0.9.0",
        "sympy>=1.13",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
        "tfds": ["tensorflow-datasets>=4.9.7", "array-record>=0.5"],
        # HF checkpoints' tokenizers (tokenizer.json) and chat templates: r1jax.data.tokenizer.HFTokenizer
        "hf": ["transformers>=4.51", "torch>=2.4", "tokenizers>=0.19", "jinja2>=3.1"],
        "parity": ["transformers>=4.51", "torch>=2.4", "tokenizers>=0.19", "jinja2>=3.1"],
        # Compiles Pallas Mosaic kernels for TPU topologies (also on a CPU-only host).
        # jax[tpu] pins the one libtpu its jaxlib was built against; pinned per Python
        # because 3.11 tops out at jax 0.10.2.
        "tpu": [
            'jax[tpu]==0.10.2; python_version < "3.12"',
            'libtpu==0.0.42.*; python_version < "3.12"',
            'jax[tpu]==0.12.0.1; python_version >= "3.12"',
            'libtpu==0.0.50.*; python_version >= "3.12"',
        ],
    },
)
