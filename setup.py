"""geoexplora: parameter-efficient extended pre-training (ExPLoRA) of ViTs on satellite imagery."""

from setuptools import find_packages, setup

# Compatible ranges, so that installing into an existing GPU environment keeps its torch/triton.
# Floors are the APIs we use (torch.library.custom_op: torch 2.4; tl.dot input_precision: triton 3.0;
# ZeRO with torch.autocast fixed: deepspeed 0.17.6). The exact set this was tested with is
# constraints.txt (`make` installs with `pip install -c constraints.txt`).
INSTALL_REQUIRES = [
    "torch>=2.4",
    "triton>=3.0; platform_system == 'Linux'",
    "deepspeed>=0.17.6",
    "timm>=1.0",
    "webdataset>=0.2.86",
    "numpy>=1.24",
    "rasterio>=1.3",
    "tifffile",
    "safetensors>=0.4",
    "tqdm",
    "pyyaml>=6",
    "tensorboard",
]

setup(
    name="geoexplora",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "kernels*", "launchers*", "shards*"]),
    package_data={"": ["*.yaml", "*.json"]},  # engine/presets/*.yaml: --config NAME
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # pytest, and the lint, format and type tools `.ci/run` runs before it (settings: pyproject.toml).
        "test": ["pytest", "ruff", "mypy", "types-PyYAML", "types-tqdm"],
        # Benchmark-only: PEFT's LoRA layer as a comparison provider.
        "bench": ["peft"],
        # Experiment loggers besides TensorBoard (--train.logger wandb,mlflow).
        "wandb": ["wandb"],
        "mlflow": ["mlflow-skinny", "sqlalchemy", "alembic"],  # the SQLite store in the run directory
    },
    entry_points={
        "console_scripts": [
            "geoexplora-convert=shards.convert:main",
            "geoexplora-pretrain=launchers.pretrain:console",
            "geoexplora-finetune=launchers.finetune:console",
            "geoexplora-evaluate=launchers.evaluate:console",
            "geoexplora-params=launchers.params:main",
            "geoexplora-demo=launchers.demo:console",
            "geoexplora-verify-kernels=kernels.verify:main",
            "geoexplora-supervise=engine.trainer.supervise:main",
        ]
    },
)
