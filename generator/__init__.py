"""The generator service: streams chat replies from a pluggable backend (llama.cpp in-process, or any OpenAI-compatible server)."""
