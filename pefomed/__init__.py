"""pefomed: parameter-efficient fine-tuning of vision-language models on medical images.

The repository's root folders install under this one name (`engine/` is `pefomed.engine`,
`kernels/` is `pefomed.kernels`, ...), so none of them shadows a PyPI package of the same
name. `pefomed.cli` is the `pefomed` command.
"""

__version__ = "0.1.0"
