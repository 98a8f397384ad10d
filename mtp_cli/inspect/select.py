"""`--tensors PATTERN`: which tensor names a pattern selects.

- `re:REGEX`: a Python regular expression, searched anywhere in the name
  (`re:^mtp\\.layers\\.\\d+\\.eh_proj`);
- a pattern with a glob character (`*`, `?`, `[`): matched against the whole name
  (`mtp.layers.*`, `*.final_layernorm.*`);
- anything else: names that contain it (`eh_proj`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from mtp_cli.errors import UserError

REGEX_PREFIX = "re:"


def name_matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate for `pattern`; UserError for a regex that does not compile."""
    if pattern.startswith(REGEX_PREFIX):
        try:
            regex = re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as error:
            raise UserError(f"--tensors {pattern!r}: not a valid regular expression ({error})"
                            ) from None
        return lambda name: regex.search(name) is not None
    if any(c in pattern for c in "*?["):
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    return lambda name: pattern in name


def select_names(pattern: str, names: Iterable[str]) -> list[str]:
    matches = name_matcher(pattern)
    return [name for name in names if matches(name)]
