"""r1flow: the DeepSeek-R1 training pipeline (arXiv 2501.12948) as a library that Snakemake rules call."""

__version__ = "0.1.0"
