"""`veil keys`: create, list, revoke and rotate API keys in the key store.

Every gateway watches the store, so a change takes effect on all of them at once.
A new or rotated key's secret is printed once, here, and kept nowhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
from nats.aio.client import Client

from bus.codec import encode
from contracts.keys import Quota
from edge.keys_admin import MAX_LIMIT, QUOTA_FIELDS, key_object
from edge.keystore import KeyNotFound, KeyStore

__all__ = ["add_keys_parser", "keys_main"]


def add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="API keys: create, ls, update, revoke, rotate")
    keys.add_argument(
        "--config", default=argparse.SUPPRESS, help="TOML config file (or VEIL_CONFIG)"
    )
    actions = keys.add_subparsers(dest="keys_action", required=True)
    create = actions.add_parser("create", help="make a key; its secret is printed once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name")
    create.add_argument(
        "--scopes", default="chat", help="comma-separated: chat, audit, admin (default chat)"
    )
    create.add_argument("--models", default="", help="comma-separated public models (default all)")
    create.add_argument("--user", help="the end user the key acts for, and only that user")
    create.add_argument(
        "--expires", type=_moment, help="a date or time (UTC unless it says otherwise)"
    )
    _add_quota_arguments(create, "")
    update = actions.add_parser("update", help="change a key's limits and budgets")
    update.add_argument("key_id")
    _add_quota_arguments(update, "; 'none' removes it")
    ls = actions.add_parser("ls", help="list keys (never their secrets)")
    ls.add_argument("--tenant")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    for name, text in (("revoke", "stop a key at once"), ("rotate", "give a key a new secret")):
        action = actions.add_parser(name, help=text)
        action.add_argument("key_id")


def _add_quota_arguments(parser: argparse.ArgumentParser, removal: str) -> None:
    """--rpm, --tpm, ... (left out: None, i.e. unlimited for create, unchanged for update)."""
    for name, text in (
        ("rpm", "requests per minute (sliding over 60 s)"),
        ("tpm", "tokens per minute, prompt and completion (sliding over 60 s)"),
        ("concurrency", "requests running at once"),
        ("budget-tokens", "tokens per budget period"),
    ):
        parser.add_argument(f"--{name}", type=_limit(int), help=text + removal)
    parser.add_argument("--budget-usd", type=_limit(float), help="USD per budget period" + removal)
    parser.add_argument(
        "--budget-period", choices=("month", "total"), help="a calendar month (UTC) or all time"
    )


# What `--rpm none` etc. give: remove that limit.
_REMOVE = "none"


def _limit(kind: type[int | float]) -> Callable[[str], int | float | str]:
    def parse(text: str) -> int | float | str:
        if text.strip().lower() == _REMOVE:
            return _REMOVE
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not 0 < value <= MAX_LIMIT:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a positive {kind.__name__} up to {MAX_LIMIT:,}"
            )
        return value

    return parse


def _quota_given(args: argparse.Namespace) -> dict[str, object]:
    """The quota fields given on the command line ('none': None, which removes one)."""
    given = {name: getattr(args, name) for name in QUOTA_FIELDS}
    return {k: (None if v == _REMOVE else v) for k, v in given.items() if v is not None}


def _limits_text(quota: Quota) -> str:
    shown = [
        f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
        for name in QUOTA_FIELDS[:-1]
        if (value := getattr(quota, name)) is not None
    ]
    if quota.limits_spend:
        shown.append(f"per={quota.budget_period}")
    return ",".join(shown) or "-"


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date or time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


async def keys_main(nc: Client, args: argparse.Namespace) -> int:
    store = await KeyStore.open(nc.jetstream())
    action = args.keys_action
    try:
        if action == "create":
            record, secret = await store.create(
                tenant=args.tenant,
                name=args.name,
                scopes=_list(args.scopes),  # type: ignore[arg-type]
                models=_list(args.models),
                user=args.user,
                expires_at=args.expires,
                quota=Quota(**_quota_given(args)),  # type: ignore[arg-type]
            )
            print(f"Created {record.id} for tenant {record.tenant}; its secret, shown only now:")
            print(secret)
            return 0
        if action == "ls":
            records = await store.list(args.tenant)
            if args.json:
                for record in records:
                    print(encode(key_object(record)).decode())
                return 0
            print(
                f"{'ID':<21} {'TENANT':<16} {'NAME':<16} {'SCOPES':<18} {'HINT':<14} "
                f"{'STATE':<8} LIMITS"
            )
            now = datetime.now(UTC)
            for r in records:
                state = "revoked" if r.revoked_at else ("live" if r.live(now) else "expired")
                print(
                    f"{r.id:<21} {r.tenant:<16} {r.name or '-':<16} {','.join(r.scopes):<18} "
                    f"{r.hint + '…':<14} {state:<8} {_limits_text(r.quota)}"
                )
            return 0
        if action == "update":
            record = await store.get(args.key_id)
            quota = msgspec.structs.replace(record.quota, **_quota_given(args))
            record = await store.set_quota(args.key_id, quota)
            print(f"Updated {record.id}: {_limits_text(record.quota)}")
            return 0
        if action == "revoke":
            record = await store.revoke(args.key_id)
            print(f"Revoked {record.id}.")
            return 0
        if action == "rotate":
            record, secret = await store.rotate(args.key_id)
            print(
                f"Rotated {record.id}; the old secret no longer works. The new one, shown only now:"
            )
            print(secret)
            return 0
    except KeyNotFound:
        print(f"veil: no live key with id {args.key_id!r}")
        return 1
    except ValueError as error:
        print(f"veil: {error}")
        return 2
    return 2
