"""Which index labels a search may return: tenant, tags and source, kept in memory.

hnswlib asks a filter about every candidate it considers, so the question must be a
C-speed `set.__contains__`: each tenant keeps the set of its live labels, and sets per
tag and per source, from which the set a filter allows is assembled once per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass, field

#: Allowed labels of a tenant with no chunks.
_NONE: frozenset[int] = frozenset()


@dataclass(frozen=True)
class SearchFilter:
    """Chunks a search may return. The tenant always applies: "" is the default tenant, not all of them."""

    tenant: str = ""
    #: The chunk carries at least one of these tags (no condition when empty).
    tags: frozenset[str] = frozenset()
    #: The chunk's source equals this (no condition when empty).
    source: str = ""
    #: The chunk's source starts with this (no condition when empty).
    source_prefix: str = ""

    @property
    def narrows_tenant(self) -> bool:
        return bool(self.tags or self.source or self.source_prefix)


@dataclass
class _Tenant:
    labels: set[int] = field(default_factory=set)
    by_tag: dict[str, set[int]] = field(default_factory=dict)
    by_source: dict[str, set[int]] = field(default_factory=dict)


class LabelFilters:
    """Live labels by tenant, tag and source."""

    def __init__(self) -> None:
        self._tenants: dict[str, _Tenant] = {}

    def add(self, label: int, tenant: str, source: str, tags: Iterable[str]) -> None:
        sets = self._tenants.setdefault(tenant, _Tenant())
        sets.labels.add(label)
        sets.by_source.setdefault(source, set()).add(label)
        for tag in tags:
            sets.by_tag.setdefault(tag, set()).add(label)

    def remove(self, label: int, tenant: str, source: str, tags: Iterable[str]) -> None:
        sets = self._tenants.get(tenant)
        if sets is None:
            return
        sets.labels.discard(label)
        _discard(sets.by_source, source, label)
        for tag in tags:
            _discard(sets.by_tag, tag, label)
        if not sets.labels:
            del self._tenants[tenant]

    def allowed(self, search: SearchFilter) -> Set[int]:
        """The live labels `search` lets through. Read-only: it may be one of the sets kept here."""
        sets = self._tenants.get(search.tenant)
        if sets is None:
            return _NONE
        if not search.narrows_tenant:
            return sets.labels
        candidates: list[Set[int]] = []
        if search.tags:
            candidates.append(_union(sets.by_tag.get(tag, _NONE) for tag in search.tags))
        if search.source:
            candidates.append(sets.by_source.get(search.source, _NONE))
        if search.source_prefix:
            candidates.append(
                _union(labels for source, labels in sets.by_source.items() if source.startswith(search.source_prefix))
            )
        candidates.sort(key=len)
        allowed = candidates[0]
        for other in candidates[1:]:
            allowed = allowed & other
        return allowed

    def tenants(self) -> int:
        return len(self._tenants)


def _discard(sets: dict[str, set[int]], key: str, label: int) -> None:
    labels = sets.get(key)
    if labels is not None:
        labels.discard(label)
        if not labels:
            del sets[key]


def _union(sets: Iterable[Set[int]]) -> Set[int]:
    """One set as is, several merged into a new one."""
    sets = [s for s in sets if s]
    if not sets:
        return _NONE
    if len(sets) == 1:
        return sets[0]
    return set().union(*sets)
