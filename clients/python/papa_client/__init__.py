"""papa-service's Python client: checkpoints, merges, jobs and populations over HTTP, with the
standard library only (numpy and torch helpers used when present)."""

from .client import Client, Population, ProblemError
from .safetensors import Tensor, dumps, load_state_dict, loads, state_dict_bytes, to_numpy, to_torch

__all__ = [
    "Client", "Population", "ProblemError", "Tensor", "dumps", "loads", "load_state_dict",
    "state_dict_bytes", "to_numpy", "to_torch",
]
