"""Backends: one small runner module each (torch, onnxruntime, tensorrt), found through the backend
table in :mod:`qatcheck.registry` (re-exported here), so naming a backend imports nothing."""
from qatcheck.registry import (BACKEND_FACTORIES, BACKEND_INPUTS, BACKENDS, backend_names,  # noqa: F401
                               check_backend, create_backend, executes, register_backend,
                               unregister_backend)
