"""The generator service: streams chat replies from a pluggable backend.

Backends: llama.cpp in-process (the default) or any OpenAI-compatible server.
"""
