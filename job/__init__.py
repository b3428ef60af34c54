"""trainjob: a containerised batch job that trains image classifiers with PyTorch."""

__version__ = "0.1.0"
