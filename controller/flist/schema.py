"""The rfs v2 (``.fl``) SQLite schema, byte-compatible with what ``rfs pack`` creates."""

from __future__ import annotations

import sqlite3

RFS_SCHEMA = """
CREATE TABLE IF NOT EXISTS inode (
    ino INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER,
    name VARCHAR(255),
    size INTEGER,
    uid INTEGER,
    gid INTEGER,
    mode INTEGER,
    rdev INTEGER,
    ctime INTEGER,
    mtime INTEGER
);
CREATE INDEX IF NOT EXISTS parents ON inode (parent);
CREATE INDEX IF NOT EXISTS names ON inode (name);
CREATE TABLE IF NOT EXISTS extra (
    ino INTEGER PRIMARY KEY,
    data VARCHAR(4096)
);
CREATE TABLE IF NOT EXISTS block (
    ino INTEGER,
    id VARCHAR(32),
    key VARCHAR(32)
);
CREATE INDEX IF NOT EXISTS block_ino ON block (ino);
CREATE TABLE IF NOT EXISTS tag (
    key VARCHAR(10) PRIMARY KEY,
    value VARCHAR(255)
);
CREATE TABLE IF NOT EXISTS route (
    start integer,
    end integer,
    url VARCHAR(2048)
);
"""

# Our one extension: rfs has no hard links (each path is its own inode row, blocks deduplicated).
# This table maps a later path's inode row to the first one so readers that know it can restore
# the link; rfs never reads it, so the file stays a valid rfs flist.
HARDLINK_TABLE = "zm_hardlink"
HARDLINK_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {HARDLINK_TABLE} (
    ino INTEGER PRIMARY KEY,
    target INTEGER NOT NULL
);
"""


def lossy_text(raw: bytes) -> str:
    """SQLite text as rfs treats names: lossy UTF-8 (corrupt bytes must not raise on read)."""
    return raw.decode("utf-8", "replace")


def create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(RFS_SCHEMA + HARDLINK_SCHEMA)


INODE_INSERT = (
    "INSERT INTO inode (parent, name, size, uid, gid, mode, rdev, ctime, mtime)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
