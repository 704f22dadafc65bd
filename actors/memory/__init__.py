"""Long-term memory: the embedder and the SQLite + sqlite-vec + FTS5 index that recall searches."""
