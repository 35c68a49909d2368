"""The store: what the proxy records, in DuckDB, declared once.

    schema.py     the column spec of every table: DDL, Arrow schema, proto mapping, upgrades
    records.py    the frozen records the proxy hands to the store
    db.py         Store: the file's one read-write connection, batched writes, read-only SQL
    writer.py     BatchWriter: the asyncio face, a queue drained in batches off the event loop
    proto_map.py  rows <-> the protobuf messages of the learner contract

Imports: flywheel.protos only.
"""
