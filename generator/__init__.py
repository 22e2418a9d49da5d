"""The generator service: streams chat replies from a pluggable backend.

Backends: llama.cpp in-process (the default), any OpenAI-compatible server, or TensorRT-LLM in-process on a GPU.
"""
