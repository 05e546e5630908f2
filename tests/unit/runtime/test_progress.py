"""Progress of a run (issue 11, CLI): a bar redrawn in place on a terminal, plain lines elsewhere,
both with images/s, failed and the time left."""

import io

from pipeline.runtime.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_bar_redrawn_in_place_with_an_eta():
    term = _Terminal()
    logged = []
    p = Progress(100, logged.append, stream=term, bar_interval=0.0)
    p.t0 -= 10.0  # 10 s in
    p.update(25, 1)
    p.update(25, 0)
    text = term.getvalue()
    assert logged == [] and text.count("\r[") == 2 and "\n" not in text
    assert "[############------------] 50/100 images (50%)" in text and "1 failed" in text
    assert "ETA 0:00:1" in text  # 50 left at about 5 images/s: about 10 s
    p.update(50, 0)
    assert term.getvalue().endswith("\n") and "100/100 images (100%)" in term.getvalue()


def test_a_log_gets_plain_lines_at_most_every_interval():
    logged = []
    p = Progress(10, logged.append, interval=3600.0, stream=io.StringIO())  # not a terminal
    p.update(4, 0)
    p.update(4, 0)
    assert logged == []  # within the interval
    p.update(2, 1)  # the last one always prints
    assert len(logged) == 1 and logged[0].startswith("progress: 10/10 images (100%)")
    assert "1 failed, ETA 0:00:00" in logged[0]
