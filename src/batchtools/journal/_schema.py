"""The journal's SQL: schema, pragmas and statements, as named constants.

A journal file contains exactly one run. Items are rows keyed by ``seq``
(their position in the input when first read); ``key`` is the content key.
Attempts that failed get a row each; the last attempt of an item lives in
its ``items`` row. ``claimed`` is the session that last read the item from
the input, so that a resume can tell items it has matched from those it
has not.

The trace of an attempt is its start, duration, job slot (from 1) and
worker (``pid N`` of a worker or command process, or a Dask worker's
address). The items row keeps them for the last attempt, as ``ended``,
``duration``, ``slot`` and ``worker``; a failed attempt's row keeps its own.
A successful attempt thus costs no row of its own. Exit statuses and the
tails of stderr travel in the error's JSON record.

Items are found by content through ``dhash``, a 64-bit hash of the digest
shared by all copies of an item. An index over it costs about half as much
to keep up as one over the 32-character keys: new items land on random
pages of any such index, and every page touched is rewritten at commit.
"""

from __future__ import annotations

APPLICATION_ID = 0x62746368  # "btch": marks the file as a batchtools journal
SCHEMA_VERSION = 2

# WAL lets `status` read while the run writes. synchronous=FULL fsyncs the
# WAL at every commit, so a committed outcome survives power loss; commits
# are grouped, so the fsync cost is paid per group, not per item.
PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA journal_size_limit=67108864",
    "PRAGMA foreign_keys=OFF",
)

CREATE = (
    f"PRAGMA application_id={APPLICATION_ID}",
    f"PRAGMA user_version={SCHEMA_VERSION}",
    """CREATE TABLE run (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        run_id TEXT NOT NULL,
        signature TEXT NOT NULL,
        spec TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        state TEXT NOT NULL,
        session INTEGER NOT NULL DEFAULT 0,
        input_complete INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE items (
        seq INTEGER PRIMARY KEY,
        key TEXT NOT NULL,
        digest TEXT NOT NULL,
        dhash INTEGER NOT NULL,
        item TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        lost_workers INTEGER NOT NULL DEFAULT 0,
        value TEXT,
        error TEXT,
        reason TEXT,
        started REAL,
        ended REAL,
        claimed INTEGER NOT NULL DEFAULT 0,
        duration REAL,
        slot INTEGER,
        worker TEXT
    )""",
    "CREATE INDEX items_dhash ON items (dhash)",
    """CREATE TABLE attempts (
        seq INTEGER NOT NULL,
        number INTEGER NOT NULL,
        started REAL NOT NULL,
        duration REAL NOT NULL,
        error TEXT NOT NULL,
        slot INTEGER,
        worker TEXT,
        PRIMARY KEY (seq, number)
    ) WITHOUT ROWID""",
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        session INTEGER NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL
    )""",
)

# The statements that bring a journal of version N to version N + 1. They
# only add columns, which SQLite does without rewriting the table, and the
# added columns are null in rows written before.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE items ADD COLUMN duration REAL",
        "ALTER TABLE items ADD COLUMN slot INTEGER",
        "ALTER TABLE items ADD COLUMN worker TEXT",
        "ALTER TABLE attempts ADD COLUMN slot INTEGER",
        "ALTER TABLE attempts ADD COLUMN worker TEXT",
        # What readers of version 1 show as the duration, so that items of
        # earlier sessions keep their place in reports after the upgrade.
        "UPDATE items SET duration = ended - started "
        "WHERE ended IS NOT NULL AND started IS NOT NULL",
    ),
}

INSERT_RUN = """
    INSERT INTO run (id, run_id, signature, spec, created, updated, state)
    VALUES (1, ?, ?, ?, ?, ?, 'running')
"""
SELECT_RUN = """
    SELECT run_id, signature, spec, created, updated, state, session,
           input_complete
    FROM run WHERE id = 1
"""
START_SESSION = """
    UPDATE run SET session = session + 1, state = 'running', updated = ?
    WHERE id = 1 RETURNING session
"""
REPLACE_SPEC = "UPDATE run SET signature = ?, spec = ? WHERE id = 1"
SET_RUN_STATE = "UPDATE run SET state = ?, updated = ? WHERE id = 1"
SET_INPUT_COMPLETE = "UPDATE run SET input_complete = 1 WHERE id = 1"
INSERT_EVENT = """
    INSERT INTO events (time, session, kind, detail) VALUES (?, ?, ?, ?)
"""

# One statement per group: json_each unpacks a JSON array of rows in C, so
# the sqlite3 module does not release and retake the GIL once per row.
# Each row is [seq, key, digest, item, session].
STAGED_COLUMNS = (
    "seq, key, digest, item, claimed, state, attempts, lost_workers, value, "
    "error, reason, started, ended, duration, slot, worker, dhash"
)
STAGED_WIDTH = 17
# A multi-row VALUES statement binds a whole group in one step, so the
# sqlite3 module does not give up and retake the GIL once per row, as
# executemany does. 1,900 rows of 17 values stay under SQLite's limit of
# 32,766 parameters.
STAGED_ROWS_PER_STATEMENT = 1900


def insert_staged(rows: int) -> str:
    """Return the statement that inserts ``rows`` staged rows."""
    one = "(" + ", ".join("?" * STAGED_WIDTH) + ")"
    return f"INSERT INTO items ({STAGED_COLUMNS}) VALUES " + ", ".join([one] * rows)


# Each row is [dhash, digest]: which of these items are stored already.
EXISTING_DIGESTS = """
    SELECT items.digest FROM json_each(?) AS j
    JOIN items ON items.dhash = j.value ->> 0 AND items.digest = j.value ->> 1
"""
COUNT_DIGEST = "SELECT count(*) FROM items WHERE dhash = ? AND digest = ?"
INSERT_ITEM = """
    INSERT INTO items (seq, key, digest, dhash, item, state, claimed)
    VALUES (?, ?, ?, ?, ?, 'pending', ?)
"""
# Each row is [seq, digest]: the stored row at that seq, if any.
MATCH_BY_SEQ = """
    SELECT j.value ->> 0, items.digest, items.key, items.state, items.attempts,
           items.lost_workers, items.value, items.error, items.reason,
           items.claimed
    FROM json_each(?) AS j LEFT JOIN items ON items.seq = j.value ->> 0
"""
CLAIM_SEQS = """
    UPDATE items SET claimed = ? WHERE seq IN (SELECT value FROM json_each(?))
"""
FIND_UNCLAIMED = """
    SELECT seq, key, state, attempts, lost_workers, value, error, reason
    FROM items WHERE dhash = ? AND digest = ? AND claimed != ?
    ORDER BY seq LIMIT 1
"""
CLAIM_SEQ = "UPDATE items SET claimed = ? WHERE seq = ?"
MAX_SEQ = "SELECT coalesce(max(seq), -1) FROM items"
SEQ_EXISTS = "SELECT 1 FROM items WHERE seq = ?"

# Each row is [seq, state, attempts, lost_workers, value, error, reason,
# started, ended, duration, slot, worker]; null leaves a column as it is.
UPDATE_ITEMS = """
    UPDATE items SET
        state = j.value ->> 1,
        attempts = coalesce(j.value ->> 2, attempts),
        lost_workers = coalesce(j.value ->> 3, lost_workers),
        value = CASE WHEN j.value ->> 1 = 'succeeded' THEN j.value ->> 4
                     ELSE items.value END,
        error = CASE WHEN j.value ->> 1 IN ('failed', 'pending', 'retrying')
                     THEN coalesce(j.value ->> 5, error) ELSE NULL END,
        reason = j.value ->> 6,
        started = coalesce(j.value ->> 7, started),
        ended = coalesce(j.value ->> 8, ended),
        duration = coalesce(j.value ->> 9, duration),
        slot = coalesce(j.value ->> 10, slot),
        worker = coalesce(j.value ->> 11, worker)
    FROM json_each(?) AS j
    WHERE items.seq = j.value ->> 0
"""
INSERT_ATTEMPTS = """
    INSERT OR REPLACE INTO attempts
        (seq, number, started, duration, error, slot, worker)
    SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3,
           j.value ->> 4, j.value ->> 5, j.value ->> 6
    FROM json_each(?) AS j
"""

COUNT_STATES = "SELECT state, count(*) FROM items GROUP BY state"
SELECT_ITEMS_IN_STATES = """
    SELECT seq, key, item, state, attempts, lost_workers, value, error, reason
    FROM items WHERE seq > ? AND state IN (SELECT value FROM json_each(?))
    ORDER BY seq LIMIT ?
"""
SELECT_ITEMS_FROM = """
    SELECT seq, key, item, state, attempts, lost_workers, value, error, reason
    FROM items WHERE seq > ? ORDER BY seq LIMIT ?
"""
SELECT_ITEM_BY_KEY = """
    SELECT seq, key, item, state, attempts, lost_workers, value, error, reason,
           started, ended
    FROM items WHERE dhash = ? AND key = ?
"""
SELECT_ITEMS_BY_KEY_START = """
    SELECT seq, key, item, state, attempts, lost_workers, value, error, reason,
           started, ended
    FROM items WHERE key LIKE ? ESCAPE '\\' LIMIT 2
"""
SELECT_ATTEMPTS = """
    SELECT number, started, duration, error FROM attempts WHERE seq = ?
    ORDER BY number
"""
