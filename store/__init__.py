"""The store: what the proxy records, in DuckDB (a file) or PostgreSQL (shared by several
proxies), declared once. `open_store` opens either, by what `[proxy] db` names.

    schema.py      the column spec of every table: DDL in both dialects, Arrow schema, proto mapping, upgrades
    records.py     the frozen records the proxy hands to the store
    base.py        StoreBase: the interface, and the writes' semantics and reads' SQL both stores share
    db.py          Store: the DuckDB file's one read-write connection, batched writes, read-only SQL
    postgres.py    PostgresStore: the same on PostgreSQL, with claims and locks for several proxies
    sandbox.py     read-only SQL (DuckDB's), and the row/byte caps and JSON both stores' replies share
    pg_sandbox.py  read-only SQL on PostgreSQL
    writer.py      BatchWriter: the asyncio face, a queue drained in batches off the event loop
    process.py     StoreProcess: either store in a child process, so its CPU never holds the proxy's GIL
    proto_map.py   rows <-> the protobuf messages of the learner contract
    summaries.py   SQL summaries: what `flywheel report` writes and the live page shows

Imports: flywheel.protos only (and psycopg, only when a postgresql:// store is opened).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

# DuckDB allocates through its own jemalloc, which by default keeps freed address space
# mapped for reuse. Under the proxy's address-space cap (memory_headroom_mb) a query that ran
# out of memory would then leave the process unable to allocate anything else; with these
# options freed memory goes back to the system within a second. Read once, when DuckDB's
# library first allocates, so it is set before duckdb is imported anywhere in the package.
os.environ.setdefault("DUCKDB_JE_MALLOC_CONF", "retain:false,dirty_decay_ms:1000,muzzy_decay_ms:0")

if TYPE_CHECKING:
    from flywheel.store.base import StoreBase
    from flywheel.store.db import StoreLimits

_POSTGRES = re.compile(r"^postgres(ql)?://", re.IGNORECASE)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class UnsupportedStore(ValueError):
    """`db` is a URL of a kind the store cannot open (only postgresql:// is, beside a DuckDB path),
    or a postgresql:// URL without the `postgres` extra installed."""


class StoreUnreachable(ConnectionError):
    """The PostgreSQL server `db` names cannot be reached or refuses the login, at open."""


def shown(db: str) -> str:
    """`db` as it may be logged or printed: a URL's password replaced by ***."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):[^@/]*@", r"\1:***@", db)


def open_store(db: str, limits: StoreLimits | None = None, read_only: bool = False,
               claim_lease_s: float = 120.0) -> StoreBase:
    """The store `db` names: a postgresql:// (or postgres://) URL opens a PostgresStore
    (`claim_lease_s`: how long its push claims last), anything else that is not a URL a DuckDB
    file (`limits`: DuckDB's caps; PostgreSQL's are the server's). Raises UnsupportedStore for
    any other URL."""
    if _POSTGRES.match(db):
        try:
            from flywheel.store.postgres import PostgresStore
        except ImportError as missing:
            raise UnsupportedStore(f"a postgresql:// store needs psycopg ({missing}): "
                                   "pip install 'flywheel-rl[postgres]'") from None

        return PostgresStore(db, read_only=read_only, claim_lease_s=claim_lease_s)
    if _URL.match(db):
        raise UnsupportedStore(f"cannot open store {db.split('://')[0]}://...: [proxy] db is a DuckDB file path "
                               "or a postgresql:// URL")
    from flywheel.store.db import Store, StoreLimits

    return Store(db, read_only=read_only, limits=limits or StoreLimits())
