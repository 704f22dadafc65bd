"""Hybrid search (vectors + BM25) in SQLite: the store that memory and knowledge share.

`hybrid.HybridIndex` keeps texts in scopes named by `Scope(kind, space, owner)`;
long-term memory (`actors.memory.index`) and the knowledge base
(`actors.knowledge.index`) each map their own partitions onto scopes of their own
kinds. `connection` opens the file for an owner's own tables.
"""
