"""Progress bars of the commands: tqdm when installed, else a plain line on stderr every 5%."""
from __future__ import annotations

import sys

__all__ = ["progress"]


class PlainProgress:
    """Stand-in for tqdm: a line on stderr every 5% of the total (every step of a short one)."""

    LINES = 20

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self._shown = total, desc, 0, 0
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done * self.LINES >= (self._shown + 1) * self.total or self.done >= self.total:
            self._shown = self.done * self.LINES // max(1, self.total)
            print(f"{self.desc}: {self.done}/{self.total}{self.postfix}", file=sys.stderr,
                  flush=True)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix_str(self, text: str) -> None:
        self.postfix = f" ({text})" if text else ""

    def close(self) -> None:
        pass


def progress(total: int, desc: str):
    """A progress bar with ``update(n)``, ``set_description(s)``, ``set_postfix_str(s)``, ``close()``."""
    try:
        from tqdm import tqdm
    except ImportError:
        return PlainProgress(total, desc)
    return tqdm(total=total, desc=desc, leave=False)
