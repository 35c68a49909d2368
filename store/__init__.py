"""The store: what the proxy records, in DuckDB, declared once.

    schema.py     the column spec of every table: DDL, Arrow schema, proto mapping, upgrades
    records.py    the frozen records the proxy hands to the store
    db.py         Store: the file's one read-write connection, batched writes, read-only SQL
    writer.py     BatchWriter: the asyncio face, a queue drained in batches off the event loop
    proto_map.py  rows <-> the protobuf messages of the learner contract
    summaries.py  SQL summaries: what `flywheel report` writes and the live page shows

Imports: flywheel.protos only.
"""

import os

# DuckDB allocates through its own jemalloc, which by default keeps freed address space
# mapped for reuse. Under the proxy's address-space cap (memory_headroom_mb) a query that ran
# out of memory would then leave the process unable to allocate anything else; with these
# options freed memory goes back to the system within a second. Read once, when DuckDB's
# library first allocates, so it is set before duckdb is imported anywhere in the package.
os.environ.setdefault("DUCKDB_JE_MALLOC_CONF", "retain:false,dirty_decay_ms:1000,muzzy_decay_ms:0")
