"""The public API and the RAG flow: ingest, search, ask."""
