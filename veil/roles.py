"""The roles a worker process may run (`veil worker --roles`), kept light for the CLI."""

from __future__ import annotations

__all__ = ["ROLES", "parse_roles"]

# What a worker process may run: session actors (with the router and the tools they ask),
# model actors, the memory and knowledge indexes (one owner per data directory), the
# usage ledger. `veil worker` runs them all unless `--roles` names some.
ROLES = ("sessions", "models", "memory", "usage")


def parse_roles(text: str) -> frozenset[str]:
    """`sessions,models` as a set of roles; ValueError names an unknown one."""
    roles = frozenset(r.strip() for r in text.split(",") if r.strip())
    unknown = sorted(roles - set(ROLES))
    if unknown or not roles:
        raise ValueError(
            f"unknown role {', '.join(unknown) or '(none)'}: choose from {', '.join(ROLES)}"
        )
    return roles
