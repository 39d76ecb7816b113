"""One error base for the whole library: bad input or a refused request, said in one line.

Every error tuner raises on purpose is a `TunerError` (a `ValueError`, so callers that caught the old
`ValueError`s still do). The library never prints it or exits; the command line (tuner/cli/__init__.py) turns
it into one line on stderr and the exit code below, in one place.

    from tuner.errors import TunerError
    try:
        run_search([])
    except TunerError as e:
        print(e)  # "no model: give --model FILE (or --synthetic)"
"""

from __future__ import annotations


class TunerError(ValueError):
    """Bad input or a refused request: a one-line message naming the problem (the CLI exits 2)."""

    exit_code = 2
