"""Installation of nnunet-ext.

The repository folders ``trainers/`` and ``planners/`` are installed under distinctive top-level names
(``nnunet_ext_trainers``, ``nnunet_ext_planners``): nnU-Net imports every module of the folder that
``nnUNet_extTrainer`` points at as a *top-level* module, so the folder must hold trainer files only, and a
generic package name such as ``trainers`` would clash with other distributions.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
version: dict = {}
exec((HERE / "nnunet_ext" / "version.py").read_text(), version)

setup(
    name="nnunet-ext",
    version=version["__version__"],
    description="nnU-Net v2 extension trainers: CIML, CAML, ACTION and CFCML inside nnU-Net's pipeline",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunet_ext", "nnunet_ext.*"]) + ["nnunet_ext_trainers", "nnunet_ext_planners"],
    package_dir={"nnunet_ext_trainers": "trainers", "nnunet_ext_planners": "planners"},
    install_requires=[
        # 2.8.0 introduced nnUNet_extTrainer; the >=2.7 build_network_architecture signature is what we target.
        "nnunetv2>=2.8.1,<2.9",
        # Mirrors nnU-Net: torch 2.9 disables cuDNN for 3D convolutions.
        "torch>=2.1.2,!=2.9.*",
        "batchgenerators>=0.25",
        "dynamic-network-architectures>=0.4.4,<0.5",
        "SimpleITK>=2.2.1",
        "numpy",
        "pandas",
        "scikit-learn",
        "scipy",  # t-intervals and the Wilcoxon test of the benchmark statistics (nnunet_ext.benchmark.statistics)
        "matplotlib",
        "medpy>=0.5",  # HD95/ASD in mm for nnunet-ext benchmark (medpy.metric.binary)
    ],
    extras_require={
        "ph2": ["openpyxl"],
        "h5": ["h5py"],
        "dev": ["pytest>=7", "ruff", "openpyxl", "h5py"],
    },
    entry_points={"console_scripts": ["nnunet-ext = nnunet_ext.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)
