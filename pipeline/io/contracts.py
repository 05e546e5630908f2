"""Table contracts: the YAML files in ``schemas/`` (shipped inside the package as ``pipeline._schemas``).

A contract lists every column of a table with its Arrow type, nullability and documentation, plus
a schema version. :func:`to_table` builds an Arrow table that conforms (or raises
:class:`ContractError` naming the table, the column and the problem); :func:`validate` checks an
existing table. Parquet files carry ``zsad.table`` and ``zsad.schema_version`` in their key-value
metadata.

Tables written from the pipeline's rows also declare how each column is projected from the row
(:mod:`pipeline.io.projection`): per field ``source`` (the in-flight column or expression, default
the field's name), ``value`` (a run-level value such as ``run_id``), ``null_unless`` (``ok``,
``decoded`` or ``map``: the row condition under which the value is kept) and ``fill`` (the value
stored for a null); per table ``rows`` (``all``, ``ok`` or ``failed``) and ``explode`` (list
columns that give one output row per element).
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pyarrow as pa
import yaml

from pipeline.errors import ZsadError

META_TABLE = b"zsad.table"
META_VERSION = b"zsad.schema_version"


class ContractError(ZsadError, ValueError):
    """A table that does not match its contract."""

    exit_code = 2


@dataclass(frozen=True)
class Field:
    name: str
    type: pa.DataType
    nullable: bool
    doc: str
    source: str | None = None  # projection from the row: the in-flight column or expression (default: name)
    value: str | None = None  # or a run-level value (run_id, clip_model...)
    null_unless: str | None = None  # ok | decoded | map: keep the value only for such rows
    fill: Any = None  # stored where the value is null


@dataclass(frozen=True)
class Contract:
    table: str
    version: int
    doc: str
    fields: tuple[Field, ...]
    rows: str = "all"  # which rows of the plan become rows of this table: all | ok | failed
    explode: tuple[str, ...] = ()  # list columns exploded in parallel: one table row per element
    shard_order: int | None = None  # a run writes it as shard files; its place among those tables
    written_when: str | None = None  # a dotted job-spec key that must be set; None: every run

    def written_by(self, spec: Any) -> bool:
        """Whether a run of ``spec`` writes this table's shards: it is a shard table and its
        ``written_when`` key is set in ``spec`` (not null, false or ``"none"``; a missing section
        counts as unset)."""
        if self.shard_order is None:
            return False
        value = spec
        for part in (self.written_when.split(".") if self.written_when else ()):
            value = getattr(value, part, None)
        return value is not None and value is not False and value != "none"

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(f.name, f.type, nullable=f.nullable) for f in self.fields],
            metadata={META_TABLE: self.table.encode(), META_VERSION: str(self.version).encode()},
        )


def _parse_type(text: str, where: str) -> pa.DataType:
    text = text.strip()
    if text.startswith("list<") and text.endswith(">"):
        return pa.list_(_parse_type(text[5:-1], where))
    try:
        return pa.type_for_alias(text)
    except (ValueError, KeyError):
        raise ContractError(f"{where}: unknown Arrow type {text!r}") from None


def _files():
    return importlib.resources.files("pipeline._schemas")


def table_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _files().iterdir() if p.name.endswith(".yaml"))


@functools.lru_cache(maxsize=None)
def load(table: str) -> Contract:
    """The contract of ``table`` (``scores``, ``errors``, ``inputs``...)."""
    resource = _files() / f"{table}.yaml"
    if not resource.is_file():
        raise ContractError(f"no contract for table {table!r}; known tables: {', '.join(table_names())}")
    raw = yaml.safe_load(resource.read_text(encoding="utf-8"))
    where = f"schemas/{table}.yaml"
    fields = []
    for item in raw["fields"]:
        fields.append(
            Field(
                name=item["name"],
                type=_parse_type(str(item["type"]), f"{where} field {item['name']}"),
                nullable=bool(item["nullable"]),
                doc=str(item.get("doc", "")),
                source=item.get("source"),
                value=item.get("value"),
                null_unless=item.get("null_unless"),
                fill=item.get("fill"),
            )
        )
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ContractError(f"{where}: duplicate field names")
    shards = raw.get("shards")
    if shards is not None and (not isinstance(shards, dict) or not isinstance(shards.get("order"), int)
                               or set(shards) - {"order", "when"}):
        raise ContractError(f"{where}: shards must be {{order: N, when: a.spec.key}} (when optional), got {shards!r}")
    return Contract(
        table=raw["table"],
        version=int(raw["version"]),
        doc=str(raw.get("doc", "")).strip(),
        fields=tuple(fields),
        rows=str(raw.get("rows", "all")),
        explode=tuple(raw.get("explode", ())),
        shard_order=shards.get("order") if shards else None,
        written_when=shards.get("when") if shards else None,
    )


def shard_tables() -> list[str]:
    """The tables a run writes as shard files (run.json lists their files), in their declared order."""
    contracts = [load(t) for t in table_names()]
    return [c.table for c in sorted((c for c in contracts if c.shard_order is not None), key=lambda c: c.shard_order)]


def written_tables(spec: Any) -> list[str]:
    """The shard tables a run of ``spec`` writes (each contract's ``shards.when``)."""
    return [t for t in shard_tables() if load(t).written_by(spec)]


def validate(table: pa.Table, contract: Contract) -> None:
    """Raise :class:`ContractError` unless ``table`` has exactly the contract's columns, in order,
    with its types, and no nulls in non-nullable columns."""
    got = table.schema.names
    missing = [n for n in contract.names if n not in got]
    extra = [n for n in got if n not in contract.names]
    if missing or extra:
        raise ContractError(
            f"table {contract.table!r} does not match its contract: missing columns {missing}, "
            f"unexpected columns {extra}"
        )
    if got != contract.names:
        raise ContractError(f"table {contract.table!r}: columns out of order: {got} != {contract.names}")
    for f in contract.fields:
        col = table.column(f.name)
        if not col.type.equals(f.type):
            raise ContractError(
                f"table {contract.table!r}: column {f.name!r} has type {col.type}, contract says {f.type}"
            )
        if not f.nullable and col.null_count:
            raise ContractError(
                f"table {contract.table!r}: column {f.name!r} has {col.null_count} null(s) but is not nullable"
            )


def to_table(rows: Mapping[str, Iterable[Any]] | pa.Table, contract: Contract) -> pa.Table:
    """Build a conforming Arrow table from columns (a mapping name -> sequence, or an Arrow table).

    Columns are selected and ordered by the contract and cast to its types; a missing column, an
    uncastable value or a null in a non-nullable column raises :class:`ContractError`.
    """
    if isinstance(rows, pa.Table):
        columns = {name: rows.column(name) for name in rows.schema.names}
    elif hasattr(rows, "columns") and hasattr(rows, "index"):  # a pandas DataFrame
        columns = {name: rows[name] for name in rows.columns}
    else:
        columns = dict(rows)
    missing = [n for n in contract.names if n not in columns]
    if missing:
        raise ContractError(f"table {contract.table!r}: missing columns {missing}")
    arrays = []
    for f in contract.fields:
        values = columns[f.name]
        try:
            if isinstance(values, (pa.Array, pa.ChunkedArray)):
                arr = values.cast(f.type)
            elif hasattr(values, "dtype") and hasattr(values, "index"):  # a pandas Series
                arr = pa.Array.from_pandas(values, type=f.type)
            else:
                arr = pa.array(_py_values(values), type=f.type, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise ContractError(
                f"table {contract.table!r}: column {f.name!r} cannot be stored as {f.type}: {exc}"
            ) from None
        arrays.append(arr)
    table = pa.Table.from_arrays(arrays, schema=contract.schema)
    validate(table, contract)
    return table


def _py_values(values: Iterable[Any]) -> list[Any]:
    out = []
    for v in values:
        if hasattr(v, "item") and not isinstance(v, (str, bytes)):
            try:
                v = v.item()
            except (ValueError, AttributeError):
                pass
        out.append(v)
    return out


def describe(contract: Contract) -> str:
    """Human-readable listing for ``zsad schema``."""
    lines = [f"{contract.table} (schema version {contract.version})", f"  {contract.doc}", ""]
    width = max(len(f.name) for f in contract.fields)
    for f in contract.fields:
        null = "nullable" if f.nullable else "required"
        lines.append(f"  {f.name:<{width}}  {str(f.type):<10} {null:<8}  {f.doc}")
    return "\n".join(lines)
