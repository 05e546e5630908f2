"""The plan's first rows: the input manifest as Arrow, with the status columns every row starts with.

Shared by the run, the passes over whole categories (:mod:`pipeline.runtime.features`) and
training, so none of them imports another for it."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io import contracts

#: the columns every row starts with: the input manifest's, and its status (rows the listing could
#: not address start as error rows of stage ``list``)
SOURCE_COLUMNS: tuple[str, ...] = (*contracts.load("inputs").names, "status", "error_stage", "error_type",
                                  "error_message")


def source_rows(manifest: pd.DataFrame) -> pa.Table:
    """The input manifest as the plan's first rows (Arrow), with their status columns."""
    table = contracts.to_table(manifest, contracts.load("inputs"))
    failed = pc.is_valid(table.column("list_error_type"))
    nothing = pa.scalar(None, pa.string())
    columns = {
        "status": pc.if_else(failed, "error", "ok"),
        "error_stage": pc.if_else(failed, pa.scalar("list"), nothing),
        "error_type": table.column("list_error_type"),
        "error_message": table.column("list_error_message"),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table
