"""`veil keys`: create, list, revoke and rotate API keys in the key store.

Every gateway watches the store, so a change takes effect on all of them at once.
A new or rotated key's secret is printed once, here, and kept nowhere.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from nats.aio.client import Client

from bus.codec import encode
from edge.keys_admin import key_object
from edge.keystore import KeyNotFound, KeyStore

__all__ = ["add_keys_parser", "keys_main"]


def add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="API keys: create, ls, revoke, rotate")
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
    ls = actions.add_parser("ls", help="list keys (never their secrets)")
    ls.add_argument("--tenant")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    for name, text in (("revoke", "stop a key at once"), ("rotate", "give a key a new secret")):
        action = actions.add_parser(name, help=text)
        action.add_argument("key_id")


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
            print(f"{'ID':<21} {'TENANT':<16} {'NAME':<16} {'SCOPES':<18} {'HINT':<14} STATE")
            now = datetime.now(UTC)
            for r in records:
                state = "revoked" if r.revoked_at else ("live" if r.live(now) else "expired")
                print(
                    f"{r.id:<21} {r.tenant:<16} {r.name or '-':<16} {','.join(r.scopes):<18} "
                    f"{r.hint + '…':<14} {state}"
                )
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
