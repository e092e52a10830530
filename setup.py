from setuptools import find_packages, setup

setup(
    name="pefomed",
    version="0.1.0",
    description="Parameter-efficient fine-tuning engine for medical vision-language models",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "kernels*", "models*", "train*", "evaluate*", "bench*"]),
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
        ],
        "deepspeed": ["deepspeed>=0.15"],
        "quant": ["bitsandbytes>=0.45"],
        "judge": ["openai>=1.40"],
        "gpu": ["flash-attn>=2.5", "xformers>=0.0.27"],
    },
)
