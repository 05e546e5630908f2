"""Few-shot memory banks: exact nearest-neighbour search by cosine similarity, in bounded memory.

The few-shot scorers of METHODS.md section 4 (WinCLIP+, APRIL-GAN few-shot, FADE few-shot) all
need, for every query feature (a patch token or a window embedding of the image being scored), its
smallest cosine distance ``1 - cos`` to a bank of reference features of the same category. They
then scale it their own way: WinCLIP+ halves it, APRIL-GAN keeps it, FADE halves it. The search is
exact: one matrix product of unit vectors per chunk, never an approximate index. Queries and the
bank are cut into chunks, so that the similarity block in memory is at most ``query_chunk`` x
``bank_chunk`` whatever the bank size. It runs on the device of the inputs (the GPU when the actor
has one).

Pure torch; no I/O. Storing and loading banks is the stage's concern (issue 15).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest_cosine_distance(queries: torch.Tensor, bank: torch.Tensor, *, query_chunk: int = 4096,
                            bank_chunk: int = 16384) -> torch.Tensor:
    """For each row of ``queries`` (N, D), ``min over the rows b of bank (M, D) of 1 - cos(q, b)``:
    a (N,) tensor in [0, 2], float32 (features are compared in float32 whatever their dtype).

    Rows are normalised here; a zero row has no direction and is an error, as is an empty bank or a
    feature-size mismatch (a bank built with another model or layer)."""
    if queries.ndim != 2 or bank.ndim != 2:
        raise ValueError(
            f"queries and bank must be 2-d (rows of features); got {tuple(queries.shape)} and {tuple(bank.shape)}"
        )
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"feature sizes differ: queries have {queries.shape[1]}, the bank has {bank.shape[1]} "
            "(a bank built with another model or layer)"
        )
    if query_chunk < 1 or bank_chunk < 1:
        raise ValueError("chunk sizes must be at least 1")
    q = _unit(queries, "query")
    b = _unit(bank, "bank")
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    for i in range(0, q.shape[0], query_chunk):
        qi = q[i : i + query_chunk]
        best = torch.full((qi.shape[0],), -float("inf"), dtype=torch.float32, device=q.device)
        for j in range(0, b.shape[0], bank_chunk):
            best = torch.maximum(best, (qi @ b[j : j + bank_chunk].T).amax(dim=1))
        out[i : i + query_chunk] = 1.0 - best
    return out.clamp_(0.0, 2.0)


def _unit(x: torch.Tensor, what: str) -> torch.Tensor:
    x = x.float()
    norms = x.norm(dim=1)
    if x.shape[0] and not bool((norms > 0).all()):
        raise ValueError(f"a {what} feature has norm 0 (row {int((norms == 0).nonzero()[0, 0])}): it has no direction")
    return F.normalize(x, dim=1)
