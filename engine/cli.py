"""The `seckill` command line.

One function per command, registered in `COMMANDS`; each imports what it
needs when it runs, so `seckill --help` stays fast. Every SeckillError, and
every error a service's client library raises (asyncpg, redis, aiormq, OSError),
ends as one line on stderr and an exit code: 2 for "called it wrong", 3 for "a
service failed". `--config` goes before or after the command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from engine import exits
from engine.config import Settings, load_settings
from engine.errors import SeckillError, UsageError, one_line

T = TypeVar("T")

EPILOG = (exits.epilog() + "\n\nsettings: --config FILE (or $SECKILL_CONFIG), overridden by "
          "SECKILL_* variables.")
RAW = argparse.RawDescriptionHelpFormatter


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop

    return uvloop.run(coro)


# -- commands -----------------------------------------------------------------
def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from engine.admin.migrate import migrate

    async def run() -> int:
        for line in await migrate(settings):
            print(line)
        return 0
    return _run_async(run())


def cmd_product_add(settings: Settings, args: argparse.Namespace) -> int:
    from engine.connections import connect_pg
    from engine.products import Product, upsert_product, validate_product

    product = validate_product(Product(args.id, args.name, args.cpus, args.memory_mb, args.gpu,
                                       args.image))

    async def run() -> int:
        conn = await connect_pg(settings)
        try:
            await upsert_product(conn, product)
        finally:
            await conn.close()
        print(f"product {product.id}: {product.name} ({product.cpus} CPUs, "
              f"{product.memory_mb} MB, {product.gpu or 'no GPU'}, {product.image})")
        return 0
    return _run_async(run())


def cmd_sale_open(settings: Settings, args: argparse.Namespace) -> int:
    from engine.connections import connect_pg
    from engine.gate.redis_gate import validate_id
    from engine.products import get_product

    pid = validate_id("product", args.product)

    async def run() -> int:
        conn = await connect_pg(settings)
        try:
            product = await get_product(conn, pid)
        finally:
            await conn.close()
        sale = await _with_gate(settings, lambda gate: gate.open_sale(
            pid, args.stock, clear_buyers=args.clear_buyers, window=window, limits=limits,
            waitlist_max=args.waitlist_max))
        print(f"sale {sale} open: product {pid} ({product.name}), stock {args.stock}"
              + (f", from {args.start_at}" if args.start_at else "")
              + (f", until {args.end_at}" if args.end_at else "")
              + (f", limits {limits}" if limits else "")
              + (f", waitlist of {args.waitlist_max} at most"
                 if args.waitlist_max is not None else ""))
        return 0
    window, limits = _sale_terms(settings, args)
    return _run_async(run())


def _sale_terms(settings: Settings, args: argparse.Namespace) -> tuple[Any, Any]:
    """The sale's window and, when any limit is given, its own limits (the settings fill
    in the rest)."""
    from engine.gate.redis_gate import Limits, Window

    window = Window(_unix_ms("start-at", args.start_at), _unix_ms("end-at", args.end_at))
    given = (args.user_rate, args.user_burst, args.ip_rate, args.ip_burst)
    if all(v is None for v in given):
        return window, None
    defaults = (settings.bff_user_rate, settings.bff_user_burst, settings.bff_ip_rate,
                settings.bff_ip_burst)
    values = [d if v is None else v for v, d in zip(given, defaults, strict=True)]
    return window, Limits(float(values[0]), int(values[1]), float(values[2]), int(values[3]))


def _unix_ms(name: str, text: str | None) -> int | None:
    """ISO 8601 (UTC unless it says otherwise) or unix seconds, as unix milliseconds."""
    import datetime as dt

    if text is None:
        return None
    try:
        return round(float(text) * 1000)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--{name}: expected ISO 8601 (2026-12-01T10:00:00Z) or unix "
                         f"seconds, got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return round(when.timestamp() * 1000)


async def _with_gate(settings: Settings, use: Callable[[Any], Awaitable[T]]) -> T:
    """Run one gate operation on a connection of its own."""
    from engine.connections import connect_redis
    from engine.gate.redis_gate import Gate
    from engine.keys import Keys

    redis = await connect_redis(settings)
    try:
        return await use(Gate(redis, Keys(settings.key_prefix)))
    finally:
        await redis.aclose()


def cmd_sale_close(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> int:
        await _with_gate(settings, lambda gate: gate.close_sale(args.product))
        print(f"sale of product {args.product} closed")
        return 0
    return _run_async(run())


def cmd_buy(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> int:
        result = await _with_gate(settings, lambda gate: gate.buy(args.product, args.user))
        extra = f" {result.stream_id} slot {result.slot}" if result.stream_id else ""
        print(f"{result.outcome}{extra}")
        return 0 if result.outcome == "accepted" else 1
    return _run_async(run())


def cmd_order_release(settings: Settings, args: argparse.Namespace) -> int:
    """The owner's DELETE .../order, for operators: prints the resulting state (LEFT,
    RELEASING, RELEASED); exit 1 with the reason when there is nothing to give back."""
    from engine.connections import connect_pg
    from engine.gate.releases import LATEST_ORDER, NoOrder, NotReleasable, request_release

    async def run() -> int:
        conn = await connect_pg(settings)
        try:
            async def fetch(pid: int, uid: int) -> Any:
                return await conn.fetchrow(LATEST_ORDER, pid, uid)

            done = await _with_gate(settings, lambda gate: request_release(
                gate, fetch, args.product, args.user))
        except (NoOrder, NotReleasable) as exc:
            print(f"seckill: {exc}", file=sys.stderr)
            return 1
        finally:
            await conn.close()
        print(done.state)
        return 0
    return _run_async(run())


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from engine.process.daemon import run

    return run(lambda: _settings(args), args.workers)


def cmd_bff(settings: Settings, args: argparse.Namespace) -> int:
    from engine.gate.app import serve

    return serve(settings, config=args.config, host=args.host, port=args.port,
                 workers=args.workers)


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    from engine.admin.stats import stats_command

    return _run_async(stats_command(settings, watch=args.watch, as_json=args.json))


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    from engine.admin.deadletters import dlq_command

    return _run_async(dlq_command(settings, args.action, args.product, args.ids,
                                  reason=args.reason, limit=args.limit, all_=args.all))


def cmd_trim(settings: Settings, args: argparse.Namespace) -> int:
    from engine.admin.trim import trim_command

    return _run_async(trim_command(settings, product_id=args.product))


def cmd_keys_init(settings: Settings, args: argparse.Namespace) -> int:
    from engine.gate.devkeys import init_keys

    public, private = init_keys(args.dir, force=args.force)
    print(f"public JWKS:  {public}   (bff_jwks = \"{public}\")")
    print(f"private key:  {private}   (seckill token --key; never give it to the BFF)")
    return 0


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from engine.gate.devkeys import mint_token, parse_ttl

    print(mint_token(args.key, args.user, ttl=parse_ttl(args.ttl),
                     issuer=settings.bff_jwt_issuer, audience=settings.bff_jwt_audience))
    return 0


def cmd_resource_domain(settings: Settings, args: argparse.Namespace) -> int:
    from engine.resource_domain.service import main as run_resource_domain

    return run_resource_domain(settings)


# -- parser ---------------------------------------------------------------------
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


Handler = Callable[[Settings, argparse.Namespace], int]
COMMANDS: list[tuple[tuple[str, ...], str, Callable[[argparse.ArgumentParser], None], Handler]]


def _add_product(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", type=_positive, required=True, help="product ID")
    p.add_argument("--name", required=True, help="instance name shown to users")
    p.add_argument("--cpus", type=_positive, required=True, help="CPU cores")
    p.add_argument("--memory-mb", type=_positive, required=True, help="memory in MB")
    p.add_argument("--gpu", default="", help="GPU model, e.g. A100")
    p.add_argument("--image", required=True, help="image, e.g. ubuntu:22.04")


def _sale_open(p: argparse.ArgumentParser) -> None:
    p.add_argument("--product", type=_positive, required=True, help="product ID")
    p.add_argument("--stock", type=_positive, required=True, help="units for sale")
    p.add_argument("--clear-buyers", action="store_true",
                   help="forget who bought in earlier sales of this product")
    p.add_argument("--start-at", help="ISO 8601 or unix seconds; before it a purchase is "
                   "425 not started (default: now)")
    p.add_argument("--end-at", help="ISO 8601 or unix seconds; from then on a purchase is "
                   "410 ended (default: no end)")
    p.add_argument("--user-rate", type=float, help="attempts/s per user (bff_user_rate)")
    p.add_argument("--user-burst", type=_positive, help="burst per user (bff_user_burst)")
    p.add_argument("--ip-rate", type=float, help="attempts/s per client IP (bff_ip_rate)")
    p.add_argument("--ip-burst", type=_positive, help="burst per client IP (bff_ip_burst)")
    p.add_argument("--waitlist-max", type=_non_negative,
                   help="users the waitlist takes at most (waitlist_max; 0 = no waitlist)")


def _product_only(p: argparse.ArgumentParser) -> None:
    p.add_argument("--product", type=_positive, required=True, help="product ID")


def _buy(p: argparse.ArgumentParser) -> None:
    _product_only(p)
    p.add_argument("--user", type=_positive, required=True, help="user ID")


def _run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_positive, default=None,
                   help="worker processes (default: the workers setting, whose 0 means "
                   "one per CPU)")


def _bff(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="address (default: the bff_host setting)")
    p.add_argument("--port", type=_positive, default=None,
                   help="port (default: the bff_port setting)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="processes (default: the bff_workers setting, whose 0 means "
                   "one per CPU)")


def _stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS")
    p.add_argument("--json", action="store_true", help="one JSON array per sample")


def _dlq(p: argparse.ArgumentParser) -> None:
    _product_only(p)
    p.add_argument("ids", nargs="*",
                   help="dead-letter entry IDs (show, replay, drop; list ignores them)")
    p.add_argument("--all", action="store_true",
                   help="show, replay, drop: every dead letter of the product (list ignores it)")
    p.add_argument("--reason", help="only dead letters with this reason (list: among its newest N)")
    p.add_argument("--limit", type=_positive, default=20,
                   help="list: the newest N (default 20; the others ignore it)")


def _trim(p: argparse.ArgumentParser) -> None:
    p.add_argument("--product", type=_positive, help="one product (default: every stream)")


def _keys_init(p: argparse.ArgumentParser) -> None:
    from engine.gate.devkeys import DEFAULT_DIR

    p.add_argument("--dir", default=DEFAULT_DIR,
                   help=f"directory of the JWKS, the private key in its private/ "
                   f"(default {DEFAULT_DIR})")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")


def _token(p: argparse.ArgumentParser) -> None:
    from engine.gate.devkeys import DEFAULT_DIR, PRIVATE_NAME

    p.add_argument("--user", type=_positive, required=True, help="user ID (the token's sub)")
    p.add_argument("--ttl", default="15m", help="lifetime, e.g. 90s, 15m, 2h (default 15m)")
    p.add_argument("--key", default=f"{DEFAULT_DIR}/{PRIVATE_NAME}",
                   help="private JWK made by `seckill keys init`")


def _nothing(p: argparse.ArgumentParser) -> None:
    pass


COMMANDS = [
    (("migrate",), "apply the database migrations (dbmate), declare the RabbitMQ topology "
     "and make its users (idempotent)",
     _nothing, cmd_migrate),
    (("product", "add"), "add or update a product", _add_product, cmd_product_add),
    (("sale", "open"), "open a sale: stock, sale ID, stream and consumer group", _sale_open,
     cmd_sale_open),
    (("sale", "close"), "stop selling (the engine still drains the backlog)", _product_only,
     cmd_sale_close),
    (("buy",), "one purchase attempt through the Lua gate in Redis (no HTTP, no token); exit 1 "
     "unless accepted", _buy, cmd_buy),
    (("order", "release"), "what an owner's DELETE .../order does: leave the waitlist, or "
     "ask for the release of a RUNNING instance (prints the state; exit 1 if nothing to "
     "give back)", _buy, cmd_order_release),
    (("run",), "the engine: pre-fork supervisor and workers", _run, cmd_run),
    (("bff",), "the HTTP gate (the BFF) on Granian, over RSGI unless bff_interface is "
     "asgi", _bff, cmd_bff),
    (("stats",), "per-sale stock, orders, lag, pending, dead letters, statuses", _stats,
     cmd_stats),
    (("dlq", "list"), "dead letters of a product, newest first", _dlq, cmd_dlq),
    (("dlq", "show"), "dead letters in full (JSON)", _dlq, cmd_dlq),
    (("dlq", "replay"), "re-drive dead letters through the engine (one row per order)", _dlq,
     cmd_dlq),
    (("dlq", "drop"), "delete dead letters", _dlq, cmd_dlq),
    (("trim",), "remove stream entries the consumer group has acknowledged (cron-safe)",
     _trim, cmd_trim),
    (("keys", "init"), "a development JWKS for the BFF, its private half kept apart (an "
     "existing pair is kept)",
     _keys_init, cmd_keys_init),
    (("token",), "print a bearer token for a user, signed with the development key", _token,
     cmd_token),
    (("resource-domain",), "the reference Resource Domain (simulated provisioning unless "
     "rd_provisioner is kubectl)", _nothing,
     cmd_resource_domain),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seckill", description="seckill engine: a flash-sale "
                                     "pipeline from a Redis gate to provisioned instances.",
                                     epilog=EPILOG,
                                     formatter_class=RAW)
    _add_config(parser, None)
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}
    for path, help_text, configure, handler in COMMANDS:
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text, description=help_text, epilog=EPILOG,
                                 formatter_class=RAW)
        else:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=f"{path[0]} commands")
                _add_config(group, argparse.SUPPRESS)
                groups[path[0]] = group.add_subparsers(dest="action", metavar="ACTION",
                                                       required=True)
            sub = groups[path[0]].add_parser(path[1], help=help_text, description=help_text,
                                             epilog=EPILOG, formatter_class=RAW)
        _add_config(sub, argparse.SUPPRESS)
        configure(sub)
        sub.set_defaults(handler=handler)
    return parser


def _add_config(parser: argparse.ArgumentParser, default: str | None) -> None:
    """`--config` before or after the command; the subcommands' copies default to
    SUPPRESS so that leaving them out keeps a value given before the command."""
    parser.add_argument("--config", default=default,
                        help="TOML settings file (default: $SECKILL_CONFIG)")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


# A service's own error classes: (module, class, what to call the service). Looked up in
# sys.modules, never imported: an exception of a library the command never loaded cannot
# have been raised, and `seckill --help` stays fast.
SERVICE_ERRORS = (
    ("asyncpg", "PostgresError", "PostgreSQL"),
    ("asyncpg", "ConnectionDoesNotExistError", "PostgreSQL"),
    ("redis.exceptions", "RedisError", "Redis"),
    ("aiormq.exceptions", "AMQPError", "RabbitMQ"),
    ("aiormq.exceptions", "ChannelInvalidStateError", "RabbitMQ"),
)
HINTS = {"UndefinedTableError": "is the database migrated? run `seckill migrate`"}


def service_failure(exc: BaseException) -> str | None:
    """One line naming the failed service, or None if `exc` is not a service failure (a bug)."""
    for module, name, service in SERVICE_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return f"{service}: {_describe(exc)}"
    if isinstance(exc, OSError):  # connection refused, reset, timed out, DNS
        return _describe(exc)
    return None


def _describe(exc: BaseException) -> str:
    text = one_line(exc)
    hint = HINTS.get(type(exc).__name__)
    return f"{text} ({hint})" if hint else text


def guarded(run: Callable[[], int], prog: str = "seckill") -> int:
    """Run a command; every failure a user can act on is one line on stderr and an exit code.

    2: called it wrong. 3: a service failed, whether it raised our ServiceError or
    its client library's own error after the connection was open (an unmigrated
    database, a Redis error reply, a closed channel). Anything else is a bug and
    keeps its traceback.
    """
    try:
        return run()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exits.USAGE
    except SeckillError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exits.SERVICE
    except KeyboardInterrupt:
        return exits.INTERRUPTED
    except Exception as exc:
        why = service_failure(exc)
        if why is None:
            raise
        print(f"{prog}: error: {why}", file=sys.stderr)
        return exits.SERVICE


def _dispatch(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from engine.logs import setup_logging

    setup_logging(settings)
    handler: Handler = args.handler
    return handler(settings, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: _dispatch(args))


if __name__ == "__main__":
    sys.exit(main())
