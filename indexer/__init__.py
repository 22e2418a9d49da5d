"""The indexer: one shard of the collection, an HNSW index over a durable SQLite chunk store."""
