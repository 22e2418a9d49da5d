"""Embedding service: ONNX Runtime over a sentence-transformers model, L2-normalised vectors."""
