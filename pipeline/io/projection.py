"""Output tables as projections of the plan's rows, driven by their contracts (``schemas/*.yaml``).

The plan hands the driver Arrow batches, one row per image with every column the stages produced
(and the input manifest's columns). Each output table is ONE projection of such a batch, declared
in its contract (see :mod:`pipeline.io.contracts`):

- ``rows``: ``all`` rows, the ``ok`` ones or the ``failed`` ones; ``explode``: list columns taken
  apart in parallel, one output row per element (the ``tiles`` table);
- per field, its ``source``: a column (``score``), a record field (``fg_components.id``: per row,
  the list of that field; in an exploded table, the element's field), a list length
  (``len(fg_components)``) or an element's position (``index(tiles)``); or a run-level ``value``;
- ``null_unless``: ``ok`` (the row's status is ok), ``decoded`` (it did not fail in decode) or
  ``map`` (it has a stored map): elsewhere the value is null; ``fill``: what a null becomes.

A nullable field whose source column is not in the batch (the job has no such stage) is all null.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.contracts import Contract, ContractError, Field, to_table

_CALL = re.compile(r"^(len|index)\((\w+)\)$")
_FIELD = re.compile(r"^(\w+)\.(\w+)$")
ROWS = ("all", "ok", "failed")


def _source(field: Field) -> str:
    return field.source or field.name


def source_column(field: Field) -> str | None:
    """The in-flight column a field reads (None for a run-level value)."""
    if field.value is not None:
        return None
    text = _source(field)
    m = _CALL.match(text) or _FIELD.match(text)
    if m:
        return m.group(2) if _CALL.match(text) else m.group(1)
    return text


def needs(contract: Contract) -> tuple[set[str], set[str]]:
    """(columns the table cannot do without, columns it reads when present)."""
    required: set[str] = {"status"} if contract.rows != "all" or any(f.null_unless for f in contract.fields) else set()
    optional: set[str] = set()
    for f in contract.fields:
        col = source_column(f)
        if col is None:
            continue
        (optional if f.nullable and not contract.explode else required).add(col)
    for f in contract.fields:
        if f.null_unless == "decoded":
            required.add("error_stage")
        elif f.null_unless == "map":
            required.add("map_png")
    required |= set(contract.explode)
    return required, optional - required


def _condition(name: str, batch: pa.Table) -> pa.Array:
    if name == "ok":
        return pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
    if name == "decoded":
        return pc.fill_null(pc.not_equal(batch.column("error_stage"), "decode"), True)
    if name == "map":
        return pc.is_valid(batch.column("map_png"))
    raise ContractError(f"unknown null_unless condition {name!r} (known: ok, decoded, map)")


def _nan_to_null(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    if pa.types.is_floating(col.type):
        return pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
    return col


def _record_field(col: pa.ChunkedArray, name: str) -> pa.Array:
    """``list<struct>`` column -> list of one struct field per row (nulls stay null)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    values = pc.struct_field(arr.values, name)
    offsets = arr.offsets
    return pa.ListArray.from_arrays(offsets, values, mask=pc.is_null(arr))


def project(batch: pa.Table, contract: Contract, values: Mapping[str, Any] | None = None) -> pa.Table:
    """The rows of ``contract``'s table from one batch of plan rows (see the module docstring)."""
    values = values or {}
    if contract.rows not in ROWS:
        raise ContractError(f"table {contract.table!r}: unknown rows {contract.rows!r} (known: {', '.join(ROWS)})")
    if contract.rows != "all":
        ok = _condition("ok", batch)
        batch = batch.filter(ok if contract.rows == "ok" else pc.invert(ok))
    if contract.explode:
        return _project_exploded(batch, contract, values)
    n = batch.num_rows
    columns: dict[str, Any] = {}
    for f in contract.fields:
        if f.value is not None:
            if f.value not in values:
                raise ContractError(f"table {contract.table!r}: field {f.name!r} needs the run value {f.value!r}")
            columns[f.name] = pa.array([values[f.value]] * n, type=f.type)
            if f.null_unless:
                columns[f.name] = pc.if_else(_condition(f.null_unless, batch), columns[f.name], pa.scalar(None, f.type))
            continue
        text = _source(f)
        col_name = source_column(f)
        if col_name not in batch.column_names:
            if not f.nullable:
                raise ContractError(f"table {contract.table!r}: field {f.name!r} reads {text!r}, which the batch lacks")
            columns[f.name] = pa.nulls(n, f.type)
            continue
        col = batch.column(col_name)
        call, record = _CALL.match(text), _FIELD.match(text)
        if call and call.group(1) == "len":
            col = pc.list_value_length(col)
        elif record:
            col = _record_field(col, record.group(2))
        col = _nan_to_null(col)
        if f.null_unless:
            col = pc.if_else(_condition(f.null_unless, batch), col, pa.scalar(None, col.type))
        if f.fill is not None:
            col = pc.fill_null(col, pa.scalar(f.fill, col.type))
        columns[f.name] = col
    return to_table(columns, contract)


def _project_exploded(batch: pa.Table, contract: Contract, values: Mapping[str, Any]) -> pa.Table:
    """One row per element of the ``explode`` list columns (taken apart in parallel)."""
    lists = {name: batch.column(name).combine_chunks() for name in contract.explode}
    first = lists[contract.explode[0]]
    lengths = pc.fill_null(pc.list_value_length(first), 0)
    for name, arr in lists.items():
        if not pc.all(pc.equal(pc.fill_null(pc.list_value_length(arr), 0), lengths)).as_py():
            raise ContractError(
                f"table {contract.table!r}: list column {name!r} does not match {contract.explode[0]!r} row by row"
            )
    parents = pc.list_parent_indices(first)
    starts = np.repeat(np.asarray(first.offsets)[:-1], np.asarray(lengths))
    position = pa.array(np.arange(len(parents)) - starts + np.asarray(first.offsets)[0], pa.int64())
    flat = {name: pc.list_flatten(arr) for name, arr in lists.items()}
    columns: dict[str, Any] = {}
    for f in contract.fields:
        if f.value is not None:
            columns[f.name] = pa.array([values[f.value]] * len(parents), type=f.type)
            continue
        text = _source(f)
        call, record = _CALL.match(text), _FIELD.match(text)
        if call and call.group(1) == "index":
            columns[f.name] = position
        elif record and record.group(1) in flat:
            columns[f.name] = pc.struct_field(flat[record.group(1)], record.group(2))
        elif text in flat:
            columns[f.name] = flat[text]
        else:
            columns[f.name] = batch.column(text).take(parents)
    return to_table(columns, contract)
