"""Installs the repository's root folders as one namespace: `engine/` is `pefomed.engine`,
`kernels/` is `pefomed.kernels`, and so on, so that none of them shadows a PyPI package
(Hugging Face's `evaluate` and `kernels` are real ones)."""

from setuptools import find_packages, setup

ROOT_PACKAGES = ("engine", "kernels", "models", "train", "evaluate", "bench")


def namespaced_packages() -> tuple[list[str], dict[str, str]]:
    packages, package_dir = ["pefomed"], {"pefomed": "pefomed"}
    for root in ROOT_PACKAGES:
        for found in [root] + [f"{root}.{sub}" for sub in find_packages(where=root)]:
            packages.append(f"pefomed.{found}")
            package_dir[f"pefomed.{found}"] = found.replace(".", "/")
    return packages, package_dir


PACKAGES, PACKAGE_DIR = namespaced_packages()

setup(
    name="pefomed",
    version="0.1.0",
    description="Parameter-efficient fine-tuning engine for medical vision-language models",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    entry_points={"console_scripts": ["pefomed = pefomed.cli:main"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "pillow>=10.0",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "nltk>=3.8",
        "pydicom>=2.4",
    ],
    extras_require={
        "dev": [
            "pytest>=8.0",
            "pytest-benchmark>=4.0",
            "pytest-timeout>=2.3",
            "peft>=0.12",
            "accelerate>=0.30",
            "pycocoevalcap>=1.2",
            "bitsandbytes>=0.45",
            "openai>=1.40",
            "gguf>=0.10",
        ],
        "deepspeed": ["deepspeed>=0.15"],
        "quant": ["bitsandbytes>=0.45"],
        "judge": ["openai>=1.40"],
        "fetch": ["gguf>=0.10"],
        "gpu": ["flash-attn>=2.5", "xformers>=0.0.27"],
    },
)
