"""Datasets: a tiny streaming interface, array-backed built-ins and loaders for real formats."""
from qatcheck.data.base import ArrayDataset, Dataset

__all__ = ["ArrayDataset", "Dataset"]
