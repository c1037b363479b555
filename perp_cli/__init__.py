"""perp: prune large language models, recover them cheaply (PERP), merge without losing sparsity."""

__version__ = "0.1.0"
