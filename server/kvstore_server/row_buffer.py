"""One growing array for the row chunks of a streamed write, so the payload is held once.

Keeping each chunk and concatenating them at the end holds the payload twice; and
the chunks, a few MiB each, come from the heap, which keeps their pages after they
are freed. Here each chunk is copied into one array as it arrives; the array's
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

    @property
    def first(self) -> np.ndarray | None:
        """A zero-row view with the dtype and width of the rows so far (None before the first chunk)."""
        return None if self._rows is None else self._rows[:0]

    def append(self, chunk: np.ndarray) -> None:
        n = len(chunk)
        if self._rows is None:
            self._rows = np.empty((max(n, FIRST_CAPACITY_ROWS),) + chunk.shape[1:], chunk.dtype)
        elif self.filled + n > len(self._rows):
            grown = np.empty((max(self.filled + n, 2 * len(self._rows)),) + self._rows.shape[1:], self._rows.dtype)
            grown[:self.filled] = self._rows[:self.filled]
            self._rows = grown
        self._rows[self.filled:self.filled + n] = chunk
        self.filled += n

    def take(self) -> np.ndarray:
        """The rows appended, as one array; the buffer lets go of them."""
        rows, self._rows = self._rows, None
        return rows[:self.filled]
