"""One growing array for the row chunks of a streamed write, so the payload is held once.

A call of one chunk (most calls) keeps that chunk as it is: no copy at all. Keeping each
of several chunks and concatenating them at the end holds the payload twice; and
the chunks, a few MiB each, come from the heap, which keeps their pages after they
are freed. Here, from the second chunk on, each is copied into one array as it arrives; the array's
capacity doubles when full, and being large it is its own memory mapping: pages
never written are not resident, and an outgrown (or cancelled) buffer goes back to
the system at once. bench/update_memory.py measures the difference.
"""
from __future__ import annotations

import numpy as np

FIRST_CAPACITY_ROWS = 1024


class RowBuffer:
    """Rows of one dtype and width, appended chunk by chunk; `take` hands over the filled part."""

    def __init__(self):
        self._rows: np.ndarray | None = None
        self.filled = 0
        self._own = False       # whether `_rows` is this buffer's array, not the first chunk itself

    @property
    def first(self) -> np.ndarray | None:
        """A zero-row view with the dtype and width of the rows so far (None before the first chunk)."""
        return None if self._rows is None else self._rows[:0]

    def append(self, chunk: np.ndarray) -> None:
        n = len(chunk)
        if self._rows is None:          # held as it is: a call of one chunk copies nothing
            self._rows, self.filled, self._own = chunk, n, False
            return
        if not self._own:               # a second chunk: from now on the rows are copied into one array
            first = self._rows[:self.filled]
            self._rows = np.empty((max(self.filled + n, FIRST_CAPACITY_ROWS),) + first.shape[1:], first.dtype)
            self._rows[:self.filled] = first
            self._own = True
        elif self.filled + n > len(self._rows):
            grown = np.empty((max(self.filled + n, 2 * len(self._rows)),) + self._rows.shape[1:], self._rows.dtype)
            grown[:self.filled] = self._rows[:self.filled]
            self._rows = grown
        self._rows[self.filled:self.filled + n] = chunk
        self.filled += n

    def take(self) -> np.ndarray:
        """The rows appended, as one array (the chunk itself when only one came: read-only if it
        is a view of the request); the buffer lets go of them."""
        rows, self._rows = self._rows, None
        return rows[:self.filled]
