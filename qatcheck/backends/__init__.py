"""Backends: one small runner module each (torch, onnxruntime, tensorrt)."""
