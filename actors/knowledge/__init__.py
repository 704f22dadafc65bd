"""The knowledge base: documents ingested as events, retrieved by hybrid search.

parse (files to sections) -> chunk (sections to overlapping chunks) -> events
(DocumentAdded / DocumentRemoved in the KB_EVENTS stream, see log) -> index (a
projection in SQLite + sqlite-vec + FTS5, rebuilt from the log at will). `ingest`
is the shell that ties them together.
"""

from actors.knowledge.index import DocumentInfo, KnowledgeIndex
from actors.knowledge.ingest import Report, collections, ingest, remove
from contracts.knowledge import KnowledgeHit
from eventstore.knowledge import DocumentAdded, DocumentRemoved, KbEvent

__all__ = [
    "DocumentAdded",
    "DocumentInfo",
    "DocumentRemoved",
    "KbEvent",
    "KnowledgeHit",
    "KnowledgeIndex",
    "Report",
    "collections",
    "ingest",
    "remove",
]
