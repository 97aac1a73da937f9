"""TaskGroups report failures as exception groups; commands report a PatchCastError in one line."""

from __future__ import annotations

from shared.errors import PatchCastError


def first_error(group: BaseExceptionGroup[BaseException]) -> PatchCastError | None:
    """The first PatchCastError inside an exception group (nested groups included)."""
    for exc in group.exceptions:
        if isinstance(exc, PatchCastError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = first_error(exc)
            if found is not None:
                return found
    return None
