"""The SQLite schema, as versioned migrations.

Tables:
- `account_data_tombstones`: one row per delete; its `stream_id` is unique across
  global and room account data. `state` is 'pending' while the homeserver write is
  under way (an intent: one a crash leaves behind is settled on its user's next
  request, see `deletion.settle`) and 'done' after; `instance` names the process that
  began it.
- `account_data_unsynced_deletes`: the design brief's table, one row per device that
  has not yet seen a delete. The brief's foreign keys point at homeserver tables that
  this database does not have, so they are omitted.
- `sync_deliveries`: which deletes a sync response carried to a device, keyed by that
  response's `next_batch`, so that a later request with `since=next_batch` proves
  receipt.
"""

from __future__ import annotations

# Each entry (a tuple of statements) moves the schema from version N-1 to N (N = position
# + 1); applied in order, one transaction each, and recorded in `PRAGMA user_version`.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE account_data_tombstones (
            -- AUTOINCREMENT: a stream_id is never reused, so a stale delivery record
            -- can never acknowledge a newer delete.
            stream_id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id TEXT NOT NULL,
            room_id TEXT,
            account_data_type TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
            created_ts INTEGER NOT NULL
        )
        """,
        # At most one settled tombstone per type; a pending one may stand beside it
        # until its homeserver write succeeds.
        """
        CREATE UNIQUE INDEX account_data_tombstones_done
            ON account_data_tombstones(user_id, COALESCE(room_id, ''), account_data_type)
            WHERE state = 'done'
        """,
        """
        CREATE TABLE account_data_unsynced_deletes (
            -- The stream_id of the delete: unique across global and room account data.
            stream_id BIGINT NOT NULL,
            user_id TEXT NOT NULL,
            account_data_type TEXT NOT NULL,
            -- The room ID if this is room account data.
            room_id TEXT,
            -- A device that has not yet seen this delete.
            device_id TEXT NOT NULL
        )
        """,
        """
        CREATE UNIQUE INDEX account_data_unsynced_deletes_stream_id_user_id_device_id
            ON account_data_unsynced_deletes(stream_id, user_id, device_id)
        """,
        """
        CREATE INDEX account_data_unsynced_deletes_user_id_device_id
            ON account_data_unsynced_deletes(user_id, device_id)
        """,
        """
        CREATE TABLE sync_deliveries (
            user_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            next_batch TEXT NOT NULL,
            stream_id INTEGER NOT NULL,
            PRIMARY KEY (user_id, device_id, next_batch, stream_id)
        ) WITHOUT ROWID
        """,
    ),
    (
        # Commit, abort and revive remove deliveries by stream_id: without this index,
        # each of them scanned the whole table.
        "CREATE INDEX sync_deliveries_stream_id ON sync_deliveries(stream_id)",
    ),
    (
        # The process that began an intent: one whose process is gone is settled by
        # another (on PostgreSQL, by any instance; here, the next process).
        "ALTER TABLE account_data_tombstones ADD COLUMN instance TEXT",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
