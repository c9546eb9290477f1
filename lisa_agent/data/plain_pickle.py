"""Read a data pickle that may come from anywhere without running it.

RefCOCO's ``refs(unc).p`` is a Python pickle (written by Python 2) of plain data: a list of dicts of
strings, numbers and lists. ``pickle.load`` on such a file would run whatever a crafted file asks for
(``os.system``...). :func:`load_plain_pickle` reads with an unpickler that builds plain values only:
lists, dicts, tuples, strings, bytes, ints, floats, booleans, None, and sets / frozensets (the only
classes old protocols import for plain data). Anything else a pickle names (a function, a class, a
persistent id, an extension code) stops the read with :class:`~lisa_agent.errors.UnsafePickleError`
before it is imported, let alone called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import IO, Any

from ..errors import UnsafePickleError

#: (module, name) pairs a plain-data pickle may import (protocols 0-3 build sets through them).
ALLOWED_GLOBALS = frozenset({(module, name) for module in ("builtins", "__builtin__") for name in ("set", "frozenset")})


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str):
        # Python 2 byte strings are decoded as UTF-8 (a superset of the ASCII LISA's pickle.load assumes).
        super().__init__(file, encoding="utf-8", errors="strict")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"{self.source}: the pickle asks to import {module}.{name}; refused, nothing was "
                                "run (a data pickle may hold only lists, dicts, tuples, sets, strings and numbers)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: the pickle refers to an outside object (persistent id); refused")


def load_plain_pickle(path: str | Path) -> Any:
    """The plain data held in the pickle at ``path``; refuses (UnsafePickleError) anything that is not.

    Raises:
        UnsafePickleError: the pickle names a function or class (the message says which).
        OSError: the file cannot be read.
        pickle.UnpicklingError / EOFError / UnicodeDecodeError: the file is not a complete pickle.
    """
    path = Path(path)
    with path.open("rb") as f:
        return _PlainUnpickler(f, str(path)).load()
