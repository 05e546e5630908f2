"""Seeing results: the HTML report of a run (``zsad report``), the heatmaps as ordinary files
(``zsad export-maps``) and the comparison of two runs (``zsad compare``). Everything is read from a
run's written tables; no Ray, nothing recomputed but plots."""
