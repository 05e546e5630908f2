"""Parquet sinks and the run manifest.

:class:`TableWriter` validates every batch against the table's contract and writes Parquet part
files ``part-00000.parquet``, ``part-00001.parquet``... of at most ``rows_per_part`` rows into one
folder (local or object storage), each carrying the contract's schema version in its metadata.
:func:`write_json` writes ``run.json`` (the run record) atomically (temp file + rename locally; a single PUT on
object storage), which makes it usable as the run's commit marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import contracts
from pipeline.io.atomic import write_atomic
from pipeline.io.fs import StorageOptions, filesystem, is_remote, join, unstrip


class TableWriter:
    """Buffered, contract-checked Parquet part writer for one table folder."""

    def __init__(
        self, folder_uri: str, table: str, storage: StorageOptions | None = None, rows_per_part: int = 50_000
    ) -> None:
        self.folder_uri = folder_uri
        self.contract = contracts.load(table)
        self.storage = storage
        self.rows_per_part = rows_per_part
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._parts = 0
        self.rows = 0
        self.files: list[str] = []
        self._fs, self._path = filesystem(folder_uri, storage)

    def clear(self) -> None:
        """Remove part files a previous attempt left in this folder (only ``part-*.parquet``)."""
        if self._fs.exists(self._path):
            for p in self._fs.glob(posixpath.join(self._path, "part-*.parquet")):
                self._fs.rm(p)

    def write(self, columns: dict[str, Any] | pa.Table) -> None:
        table = contracts.to_table(columns, self.contract)
        if table.num_rows == 0:
            return
        self._buffer.append(table)
        self._buffered += table.num_rows
        while self._buffered >= self.rows_per_part:
            self._flush(self.rows_per_part)

    def _flush(self, limit: int | None = None) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        take = table.num_rows if limit is None else min(limit, table.num_rows)
        head, rest = table.slice(0, take), table.slice(take)
        self._write_part(head)
        self._buffer = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows

    def _write_part(self, table: pa.Table) -> None:
        name = f"part-{self._parts:05d}.parquet"
        path = posixpath.join(self._path, name) if is_remote(self.folder_uri) else os.path.join(self._path, name)
        if not is_remote(self.folder_uri):
            os.makedirs(self._path, exist_ok=True)
        with self._fs.open(path, "wb") as fh:
            pq.write_table(table.replace_schema_metadata(self.contract.schema.metadata), fh)
        self._parts += 1
        self.rows += table.num_rows
        self.files.append(join(self.folder_uri, name))

    def close(self) -> list[str]:
        """Flush; a table that received no rows still gets one empty part with the schema."""
        self._flush()
        if self._parts == 0:
            self._write_part(self.contract.schema.empty_table())
        return self.files


def write_table(
    uri: str, columns: dict[str, Any] | pa.Table, table: str, storage: StorageOptions | None = None
) -> pa.Table:
    """Write one contract-checked Parquet file (e.g. ``inputs.parquet``)."""
    contract = contracts.load(table)
    t = contracts.to_table(columns, contract)
    fs, path = filesystem(uri, storage)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        pq.write_table(t.replace_schema_metadata(contract.schema.metadata), fh)
    return t


def write_json(uri: str, data: dict[str, Any], storage: StorageOptions | None = None) -> None:
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    write_atomic(uri, text.encode(), storage)


def read_json(uri: str, storage: StorageOptions | None = None) -> dict[str, Any]:
    fs, path = filesystem(uri, storage)
    with fs.open(path, "r") as fh:
        return json.load(fh)


def read_json_if_exists(uri: str, storage: StorageOptions | None = None) -> dict[str, Any] | None:
    """:func:`read_json`, or None when there is no such file or object."""
    try:
        return read_json(uri, storage)
    except FileNotFoundError:
        return None


def read_folder(uri: str, storage: StorageOptions | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    """Every ``*.parquet`` file of a table folder as one DataFrame, reading only ``columns``; a
    column a file lacks (written under an older contract version) comes back as nulls. An empty or
    missing folder gives an empty frame with those columns."""
    fs, path = filesystem(uri, storage)
    try:
        files = sorted(fs.glob(posixpath.join(path, "*.parquet")))
    except FileNotFoundError:
        files = []
    frames = []
    for f in files:
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            have = set(pf.schema_arrow.names)
            take = None if columns is None else [c for c in columns if c in have]
            frame = pf.read(columns=take).to_pandas()
        for c in columns or []:
            if c not in frame.columns:
                frame[c] = None
        frames.append(frame if columns is None else frame[list(columns)])
    frames = [f for f in frames if len(f)] or frames[:1]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns or [])


class ShardSink:
    """Idempotent per-shard outputs with done markers (resume = list the markers).

    Shard k of a run writes ``TABLE/shard-0000k.parquet`` for every table (an empty file with the
    schema when the shard has no rows for it), then ``_done/shard-0000k.json`` LAST. A shard without
    a marker is rerun in full and its files are overwritten, so no row is lost or duplicated.

    Rows are streamed into the shard's files as they arrive (:meth:`append`), so the driver holds
    one result batch at a time, not whole shards; :meth:`finish` makes the files visible."""

    def __init__(self, run_dir: str, tables: list[str], storage: StorageOptions | None = None) -> None:
        self.run_dir, self.tables, self.storage = run_dir, tables, storage
        self.contracts = {t: contracts.load(t) for t in tables}
        self.finished: dict[
            int, dict[str, Any]
        ] = {}  # markers this sink wrote (what is known without reading them back)
        self._open: dict[int, dict[str, tuple[Any, Any, str, str | None]]] = {}

    @staticmethod
    def name(shard: int) -> str:
        return f"shard-{shard:05d}"

    def markers(self) -> dict[int, dict[str, Any]]:
        """Done shards -> their marker contents."""
        fs, path = filesystem(join(self.run_dir, "_done"), self.storage)
        out = {}
        try:
            found = fs.glob(posixpath.join(path, "shard-*.json"))
        except FileNotFoundError:
            found = []
        for p in found:
            with fs.open(p, "r") as fh:
                data = json.load(fh)
            out[int(data["shard"])] = data
        return out

    def _start(self, shard: int) -> dict[str, tuple[Any, Any, str, str | None]]:
        """Open one streaming Parquet writer per table for ``shard``. Local files are written under a
        hidden temporary name and renamed when the shard finishes; object stores write the final key,
        which only appears when the upload completes (at :meth:`finish`)."""
        open_ = {}
        for table in self.tables:
            uri = join(self.run_dir, table, self.name(shard) + ".parquet")
            fs, path = filesystem(uri, self.storage)
            final = None
            if not is_remote(uri):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                final, path = path, os.path.join(os.path.dirname(path), f".{self.name(shard)}.parquet.part")
            fh = fs.open(path, "wb")
            schema = self.contracts[table].schema
            writer = pq.ParquetWriter(fh, schema.with_metadata(schema.metadata))
            open_[table] = (writer, fh, path, final)
        self._open[shard] = open_
        return open_

    def append(self, shard: int, columns: dict[str, dict[str, Any] | pa.Table]) -> None:
        """Add rows (per table: an Arrow table or columns) to ``shard``'s files, checked against each
        table's contract; nothing is visible as a shard file until :meth:`finish`."""
        writers = self._open.get(shard) or self._start(shard)
        for table, cols in columns.items():
            t = contracts.to_table(cols, self.contracts[table])
            if t.num_rows:
                writers[table][0].write_table(t)

    def finish(self, shard: int, marker: dict[str, Any]) -> None:
        """Close ``shard``'s files (an empty file with the schema for a table without rows), then
        write its done marker LAST."""
        if shard not in self._open:
            self._start(shard)
        writers = self._open.pop(shard)
        try:
            for writer, fh, path, final in writers.values():
                writer.close()
                fh.close()
                if final is not None:
                    os.replace(path, final)
        except BaseException:
            for entry in writers.values():  # e.g. the object store went away: let go of the rest too
                _abandon(*entry)
            raise
        write_json(join(self.run_dir, "_done", self.name(shard) + ".json"), {"shard": shard, **marker}, self.storage)
        self.finished[shard] = {"shard": shard, **marker}

    def discard(self) -> None:
        """Drop unfinished shards (their files are rewritten in full by the next attempt)."""
        for shard in list(self._open):
            for entry in self._open.pop(shard).values():
                _abandon(*entry)

    def files(self, table: str) -> list[str]:
        fs, path = filesystem(join(self.run_dir, table), self.storage)
        try:
            return [unstrip(fs, p) for p in sorted(fs.glob(posixpath.join(path, "shard-*.parquet")))]
        except FileNotFoundError:
            return []


def _abandon(writer: Any, fh: Any, path: str, final: str | None) -> None:
    """Let go of one unfinished shard file (its shard has no marker and is rerun in full), quietly
    and for good: a local temporary file is removed; an object-store upload is dropped, never
    published, and marked closed so that garbage collection does not try to upload it later (with
    the store gone, that printed a traceback from fsspec's finaliser)."""
    try:
        writer.close()
    except Exception:
        pass
    finally:
        writer.is_open = False  # pyarrow's finaliser closes a writer still marked open
    if final is None:
        try:
            fh.discard()
        except Exception:
            pass
        fh.closed = True
        return
    try:
        fh.close()
    except Exception:
        pass
    with contextlib.suppress(OSError):
        os.remove(path)
