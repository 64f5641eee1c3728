"""Where Engram tables live: device, host RAM or disk, optionally behind a row cache, fetched in the
background right after hashing. Applied as a transform on a built model (``apply_storage``)."""

from engram.storage.apply import OffloadedEmbedding, StorageHandle, apply_storage, serve_stores
from engram.storage.cache import RowCache
from engram.storage.export import TableEntry, TableError, TableManifest, export_tables, open_tables
from engram.storage.formats import FORMATS, RowFormat, row_format
from engram.storage.prefetch import Prefetcher
from engram.storage.stores import ConcatStore, DiskStore, HostStore

__all__ = ["FORMATS", "ConcatStore", "DiskStore", "HostStore", "OffloadedEmbedding", "Prefetcher", "RowCache", "RowFormat",
           "StorageHandle", "TableEntry", "TableError", "TableManifest", "apply_storage", "export_tables",
           "open_tables", "row_format", "serve_stores"]
