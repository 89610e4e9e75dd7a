"""The one logical replication reader pgferry has: ``pgoutput`` from a publication, through a slot, to typed events.

Three features stand on it — online migration (bulk copy on an exported snapshot, then follow the
stream), the realtime change feed, and the ElectricSQL-protocol dev sync server — so it is written once
and owns everything about logical replication that they would otherwise each get subtly wrong:

* publication and slot management (:mod:`~pgferry.replication.slots`): idempotent, easy to clean up,
  because a forgotten slot keeps WAL until the disk is full; preparing tables for a publication
  (:mod:`~pgferry.replication.tables`): membership and REPLICA IDENTITY FULL without queueing writers, and the
  horizon a snapshot must wait for after a table joins;
* snapshot export (:func:`~pgferry.replication.slots.exported_snapshot`): the slot and a snapshot of the
  data at exactly the slot's start, so a copy plus the stream see every row once;
* decoding (:mod:`~pgferry.replication.decoder`, pure) into committed :class:`Transaction`\\ s of typed
  :class:`RowChange` / :class:`TruncateChange` events, with xid, commit LSN and commit time
  (:mod:`~pgferry.replication.reader`);
* confirm-after-durable-store: the reader never confirms a transaction the consumer has not confirmed;
* resume: after a reconnect or restart, everything not confirmed is delivered again, and consumers skip
  what they stored already by ``commit_lsn``;
* following a slot for a server's whole life (:class:`~pgferry.replication.follow.SlotFollower`): a thread that
  restarts a failed stream with backoff and reports its status for health endpoints.

It must not know about shapes, HTTP, RLS or migrations: consumers get rows as PostgreSQL text plus type
OIDs and decide what they mean. Connections are psycopg 3 (a ``replication=database`` connection driven
at the libpq level); see :mod:`pgferry.replication._conn` for why not psycopg2.
"""

from pgferry.replication._conn import ReplicationError
from pgferry.replication.decoder import DecodeError, decode_message
from pgferry.replication.follow import RESTART_POLICY, FollowerStatus, SlotFollower
from pgferry.replication.lsn import Lsn
from pgferry.replication.reader import (
    RECONNECT_POLICY,
    Change,
    ColumnInfo,
    ReaderStats,
    RelationInfo,
    ReplicationReader,
    ReplicationStreamEndedError,
    RowChange,
    Transaction,
    TransactionAssembler,
    TruncateChange,
    classify_replication_error,
)
from pgferry.replication.slots import (
    SlotExistsError,
    SlotInfo,
    SlotNotFoundError,
    SlotState,
    create_slot,
    drop_publication,
    drop_slot,
    ensure_publication,
    exported_snapshot,
    get_slot,
    publication_tables,
    slot_exists,
    slot_lag_bytes,
)
from pgferry.replication.tables import PublishedTables, current_horizon, passed_horizon, publish_tables

__all__ = [
    "RECONNECT_POLICY",
    "RESTART_POLICY",
    "Change",
    "ColumnInfo",
    "DecodeError",
    "FollowerStatus",
    "Lsn",
    "PublishedTables",
    "ReaderStats",
    "RelationInfo",
    "ReplicationError",
    "ReplicationReader",
    "ReplicationStreamEndedError",
    "RowChange",
    "SlotExistsError",
    "SlotFollower",
    "SlotInfo",
    "SlotNotFoundError",
    "SlotState",
    "Transaction",
    "TransactionAssembler",
    "TruncateChange",
    "classify_replication_error",
    "create_slot",
    "current_horizon",
    "decode_message",
    "drop_publication",
    "drop_slot",
    "ensure_publication",
    "exported_snapshot",
    "get_slot",
    "passed_horizon",
    "publication_tables",
    "publish_tables",
    "slot_exists",
    "slot_lag_bytes",
]
