"""`veil usage`: tokens, requests and cost from the usage ledger, as a table, JSON or CSV.

It asks the running Veil's usage service; with none running it brings the ledger file
up to date with the log itself, then reads it. `--rebuild` drops the ledger and counts
the whole log again (the server must be stopped: it owns the file while it runs).
"""

from __future__ import annotations

import argparse
import csv
import sys
from datetime import UTC, date, datetime
from typing import Any, TextIO

from nats.errors import NoRespondersError

from bus.codec import encode
from bus.connection import connect
from bus.requests import nats_request
from bus.subjects import USAGE_QUERY
from config import Config
from contracts.usage import (
    USAGE_GROUPS,
    USAGE_QUERY_CODEC,
    USAGE_REPORT_CODEC,
    UsageGroup,
    UsageQuery,
    UsageReport,
    UsageRow,
)

__all__ = ["add_usage_parser", "render", "usage_main"]

# The row fields each grouping fills, and its column's title.
_FIELDS: dict[UsageGroup, str] = {
    "day": "day",
    "tenant": "tenant",
    "key": "key_id",
    "user": "user",
    "model": "model",
    "pipeline": "pipeline",
    "engine": "engine",
    "upstream_model": "upstream_model",
}
_SUMS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd")


def add_usage_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = sub.add_parser(
        "usage", help="tokens, requests and cost by model, key, day, user, pipeline"
    )
    usage.add_argument(
        "--config", default=argparse.SUPPRESS, help="TOML config file (or VEIL_CONFIG)"
    )
    usage.add_argument("--tenant", help="one tenant (default: every tenant)")
    usage.add_argument("--key", help="one key id")
    usage.add_argument("--user", help="one end user")
    usage.add_argument("--since", type=_day, help="first day, YYYY-MM-DD (default: the 1st)")
    usage.add_argument("--until", type=_day, help="last day, YYYY-MM-DD (default: today, UTC)")
    usage.add_argument(
        "--by",
        default="model",
        type=_groups,
        help=f"comma-separated groupings: {', '.join(USAGE_GROUPS)} (default model)",
    )
    form = usage.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="one JSON object per line")
    form.add_argument("--csv", action="store_true", help="CSV with a header line")
    form.add_argument(
        "--rebuild", action="store_true", help="drop the ledger and count the whole log again"
    )


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day (YYYY-MM-DD): {text!r}") from None


def _groups(text: str) -> tuple[UsageGroup, ...]:
    groups: list[UsageGroup] = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        group = next((g for g in USAGE_GROUPS if g == name), None)
        if group is None:
            raise argparse.ArgumentTypeError(
                f"unknown grouping {name!r} (use {', '.join(USAGE_GROUPS)})"
            )
        if group not in groups:
            groups.append(group)
    return tuple(groups)


async def usage_main(config: Config, url: str, args: argparse.Namespace) -> int:
    if args.rebuild:
        from veil.usage_role import rebuild_ledger

        events, rows = await rebuild_ledger(config, url)
        print(f"Rebuilt the usage ledger from {events} events: {rows} rows.")
        return 0
    today = datetime.now(UTC).date()
    query = UsageQuery(
        tenant=args.tenant,
        key_id=args.key,
        user=args.user,
        since=args.since or today.replace(day=1),
        until=args.until or today,
        group_by=args.by,
    )
    nc = await connect(url, name="veil-usage")
    try:
        try:
            reply = await nats_request(nc, USAGE_QUERY, USAGE_QUERY_CODEC.encode(query), timeout=30)
            if reply.headers and reply.headers.get("Nats-Service-Error-Code"):
                print(f"veil: {reply.headers.get('Nats-Service-Error')}", file=sys.stderr)
                return 1
            report = USAGE_REPORT_CODEC.decode(reply.data)
        except NoRespondersError:
            from veil.usage_role import offline_report

            report = await offline_report(config, nc, query)
    finally:
        await nc.drain()
    form = "json" if args.json else "csv" if args.csv else "table"
    render(report, args.by, form, sys.stdout)
    if report.truncated:
        print(f"veil: only the first {len(report.rows)} groups are shown", file=sys.stderr)
    return 0


def _record(row: UsageRow, groups: tuple[UsageGroup, ...]) -> dict[str, Any]:
    record: dict[str, Any] = {_FIELDS[g]: getattr(row, _FIELDS[g]) for g in groups}
    if "day" in record and record["day"] is not None:
        record["day"] = record["day"].isoformat()
    record.update(
        requests=row.requests,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        total_tokens=row.prompt_tokens + row.completion_tokens,
        cost_usd=round(row.cost_usd, 9),
    )
    return record


def render(report: UsageReport, groups: tuple[UsageGroup, ...], form: str, out: TextIO) -> None:
    """The report as a table (with a total line), JSON lines or CSV."""
    records = [_record(row, groups) for row in report.rows]
    columns = [*(_FIELDS[g] for g in groups), *_SUMS]
    if form == "json":
        out.writelines(encode(record).decode() + "\n" for record in records)
        return
    if form == "csv":
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return
    lines = [[c.upper() for c in columns]]
    lines += [[_cell(r.get(c)) for c in columns] for r in records]
    if groups:
        total = [_cell(sum(r[c] for r in records)) for c in _SUMS]
        lines.append(["TOTAL", *([""] * (len(groups) - 1)), *total])
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    numeric = len(groups)
    for line in lines:
        cells = [
            cell.rjust(width) if i >= numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        out.write("  ".join(cells).rstrip() + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)
