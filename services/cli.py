"""The ``newsmon`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from newsmon.bus import BusError
from newsmon.logs import configure_logging
from newsmon.settings import Settings


def _setting(loc: tuple[int | str, ...]) -> str:
    """A settings error's field as the variable that sets it: ``NEWSMON_FEEDS_FILE``."""
    if not loc:
        return "settings"
    head = f"NEWSMON_{str(loc[0]).upper()}"
    return ".".join([head, *map(str, loc[1:])])


def _score(settings: Settings, args: argparse.Namespace) -> int:
    from newsmon.classify.batch import Feedback
    from newsmon.classify.batch import run as score_file
    from newsmon.migrate import migrate_url

    if args.feedback is None:
        return score_file(settings, args.input, args.output, args.topics)
    if args.review_per_day < 0:
        print("newsmon score: --review-per-day must be >= 0", file=sys.stderr)
        return 2
    if not args.feedback.is_file():
        print(f"newsmon score: no such file: {args.feedback}", file=sys.stderr)
        return 2
    # The backtest's labels go to a scratch database, never to the real topics.
    with tempfile.TemporaryDirectory(prefix="newsmon-backtest-") as scratch:
        url = f"sqlite+aiosqlite:///{Path(scratch) / 'backtest.db'}"
        asyncio.run(migrate_url(url))
        feedback = Feedback(args.feedback, args.review_per_day, url)
        return score_file(settings, args.input, args.output, args.topics, feedback)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="newsmon", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="all three services in one process (embedded default)")
    for name in ("ingest", "classify", "alerts"):
        commands.add_parser(name, help=f"the {name} service alone, on Kafka")
    score = commands.add_parser(
        "score", help="score a JSONL file of articles with the configured topics"
    )
    score.add_argument("input", type=Path, help="JSONL: id, title, summary, content (optional)")
    score.add_argument("-o", "--output", type=Path, help="JSONL of scores (default: stdout)")
    score.add_argument("--topics", type=Path, help="a topics TOML file instead of the store's")
    score.add_argument(
        "--feedback",
        type=Path,
        metavar="LABELS.jsonl",
        help="backtest: day by day, label each day's matches and review queue from this file"
        " ({id, topics} lines) before scoring the next day",
    )
    score.add_argument(
        "--review-per-day",
        type=int,
        default=3,
        metavar="K",
        help="with --feedback: review-queue articles labelled per topic per day (default 3)",
    )
    commands.add_parser("migrate", help="bring the database schema to the newest revision")
    for sub in commands.choices.values():
        sub.add_argument("--host", help="HTTP API address (NEWSMON_HTTP_HOST)")
        sub.add_argument("--port", type=int, help="HTTP API port (NEWSMON_HTTP_PORT)")
        sub.add_argument("--bus", help="bus URL (NEWSMON_BUS_URL)")
        sub.add_argument("--database", help="database URL (NEWSMON_DATABASE_URL)")
    del run
    args = parser.parse_args(argv)

    overrides = {
        key: value
        for key, value in {
            "http_host": args.host,
            "http_port": args.port,
            "bus_url": args.bus,
            "database_url": args.database,
        }.items()
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_setting(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        parser.exit(2, f"newsmon: invalid settings: {problems}\n")
    except SettingsError as exc:
        # A value the environment holds that is not even JSON (NEWSMON_API_KEYS, lists).
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        parser.exit(2, f"newsmon: invalid settings: {exc}{cause}\n")
    configure_logging(settings.log_level, settings.log_format)
    if args.command in ("score", "migrate"):
        from newsmon.migrate import migrate_url

        # Only the migrations create tables, whichever command comes first on a new database.
        asyncio.run(migrate_url(settings.database_url))
    if args.command == "score":
        return _score(settings, args)
    if args.command == "migrate":
        return 0
    roles: tuple[str, ...]
    if args.command == "run":
        roles = ("ingest", "classify", "alerts")
    else:
        roles = (args.command,)
        if settings.bus_url.startswith("memory:"):
            parser.error(
                f"'newsmon {args.command}' runs one service alone and needs a shared bus: "
                "set NEWSMON_BUS_URL=kafka://host:port, or database:// on a database the "
                "other services share (or use 'newsmon run')"
            )

    from newsmon.runner import serve

    try:
        asyncio.run(serve(settings, roles))
    except BusError as exc:
        logging.getLogger(__name__).critical("bus failure: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
