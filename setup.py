"""geoexplora: parameter-efficient extended pre-training (ExPLoRA) of ViTs on satellite imagery."""
from setuptools import find_packages, setup

# Pinned to the set verified to install together (CUDA build of torch; runs on CPU too).
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "triton==3.8.0",
    "deepspeed==0.19.8",
    "timm==1.0.31",
    "webdataset==1.0.2",
    "numpy==2.4.6",
    "rasterio==1.4.4",
    "tifffile",
    "safetensors",
    "tqdm",
    "pyyaml",
    "tensorboard",
]

setup(
    name="geoexplora",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "kernels*", "launchers*", "shards*"]),
    package_data={"": ["*.yaml", "*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest"],
        # Benchmark-only: PEFT's LoRA layer as a comparison provider.
        "bench": ["peft"],
    },
    entry_points={
        "console_scripts": [
            "geoexplora-convert=shards.convert:main",
            "geoexplora-verify-kernels=kernels.verify:main",
        ]
    },
)
