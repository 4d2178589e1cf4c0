"""Model builders: export, ONNX-level PTQ, pytorch-quantization Q/DQ, QAT."""
