"""Small file-tree helpers for layout tests."""

from __future__ import annotations

import os


def touch(root, *rels, data=b"x"):
    """Create files ``root/rel`` (parents included) holding ``data``."""
    for rel in rels:
        path = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
