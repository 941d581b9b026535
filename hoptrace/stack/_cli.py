"""The sample stack's commands: ``hoptrace stack`` (run it in the foreground until SIGINT/SIGTERM),
``hoptrace demo`` (the whole job on it) and ``hoptrace record-samples`` (re-record sample_traces/)."""

from __future__ import annotations

import asyncio
import math
import signal
from pathlib import Path

import click

from hoptrace._click import BadInput, OneLineCommand, exit_2_on_bad_input
from hoptrace._options import out_folder_option
from hoptrace.stack.config import JWT_ALGORITHMS, PROPAGATION_MODES, SERVICES, StackConfig, StackError
from hoptrace.stack.runner import RunningStack, start_stack


def _assignments(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """``SERVICE=VALUE`` pairs, keyed by a known service name."""
    pairs: dict[str, str] = {}
    for value in values:
        service, sep, rest = value.partition("=")
        if not sep or not rest:
            raise click.BadParameter(f"expected SERVICE=VALUE, got {value!r}", ctx, param)
        if service not in SERVICES:
            raise click.BadParameter(
                f"unknown service {service!r} (services: {', '.join(SERVICES)})", ctx, param
            )
        if service in pairs:
            raise click.BadParameter(f"{service} given twice", ctx, param)
        pairs[service] = rest
    return pairs


def _ports(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, int]:
    ports = {}
    for service, text in _assignments(ctx, param, values).items():
        try:
            ports[service] = int(text)
        except ValueError:
            raise click.BadParameter(
                f"port of {service} is not a number: {text!r}", ctx, param
            ) from None
    return ports


# Token lifetimes and clock offsets past this are typos, not tests (and would overflow a JWT's exp).
_YEAR = 365 * 24 * 3600


class _FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan (which compares false with both of its bounds)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


def _number(flag: str, kind: type, default: float, help: str, low: float, high: float):
    """A numeric option of the stack within [low, high], its default shown in --help."""
    bounded = click.IntRange(low, high) if kind is int else _FiniteRange(low, high)
    return click.option(flag, type=bounded, default=default, show_default=True, help=help)


def _choice(flag: str, choices: tuple[str, ...], help: str):
    """An option of the stack taking one of ``choices``, the first by default (shown in --help)."""
    return click.option(flag, type=click.Choice(choices), default=choices[0], show_default=True, help=help)


@click.command(
    "stack",
    cls=OneLineCommand,
    # \b keeps click from re-wrapping the example across lines.
    epilog="\b\nExample: hoptrace stack --ttl 3 --upstream auth=http://127.0.0.1:13001",
)
@click.option(
    "--port",
    "ports",
    multiple=True,
    callback=_ports,
    metavar="SERVICE=PORT",
    help="Port a service listens on (repeatable; 0 picks a free one). "
    "Defaults: gateway 8080, auth 3001, products 3002, cart 3003, payment 3004.",
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    callback=_assignments,
    metavar="SERVICE=URL",
    help="Base URL the other services use to reach SERVICE, e.g. a proxy listener "
    "(repeatable, loopback only). Default: the service's own port.",
)
@_number("--ttl", int, 3600, "Token lifetime in seconds.", 1, 10 * _YEAR)
@_number("--work-seconds", float, 1.0, "How long payment works before re-validating the token with auth.", 0, 3600)
@_number("--payment-clock-offset", float, 0.0, "Fault: payment's clock runs this many seconds ahead (its Date header and its own expiry check).", -_YEAR, _YEAR)
@click.option(
    "--shared-client",
    is_flag=True,
    help="Fault: the gateway sets tokens on one client shared by all requests (token crossover).",
)
@_number("--flaky-rate", float, 0.0, "Fault: share of products requests answered 503; callers retry with backoff.", 0, 1)
@_number("--flaky-seed", int, 0, "Seed of the 503 draws.", 0, 2**63 - 1)
@_number("--rate-limit", int, 0, "Fault: products answers 429 (Retry-After: 1) beyond this many requests a second (0: no limit).", 0, 10**6)
@click.option("--retry-no-backoff", is_flag=True, help="Fault: callers retry failed GETs at once, ignoring Retry-After.")
@click.option(
    "--key-missing-caller",
    type=click.Choice(SERVICES),
    help="Fault: this service's calls leave out X-Internal-Key, which the other services then require (401).",
)
@click.option("--leak-internal-key", is_flag=True, help="Fault: the gateway echoes X-Internal-Key to the client.")
@click.option(
    "--token-audience",
    "token_audience",
    multiple=True,
    metavar="AUD",
    help="Fault: auth issues tokens with this aud (repeatable); nothing checks it.",
)
@click.option(
    "--refresh-race",
    is_flag=True,
    help="Fault: login hands out one-time refresh tokens (POST /auth/refresh); a second use is refused.",
)
@_choice("--jwt-algorithm", JWT_ALGORITHMS, "How auth signs tokens: a shared secret, or an RSA key with a kid published at GET /.well-known/jwks.json.")
@_number("--rotate-key-after", int, 0, "Fault (RS256): auth rotates its key after this many tokens, dropping the old one at once (0: never).", 0, 10**9)
@_choice("--propagate", PROPAGATION_MODES, "Trace context the services forward on every downstream call.")
def stack(
    ports: dict[str, int],
    upstreams: dict[str, str],
    ttl: int,
    work_seconds: float,
    payment_clock_offset: float,
    shared_client: bool,
    flaky_rate: float,
    flaky_seed: int,
    rate_limit: int,
    retry_no_backoff: bool,
    key_missing_caller: str | None,
    leak_internal_key: bool,
    token_audience: tuple[str, ...],
    refresh_race: bool,
    jwt_algorithm: str,
    rotate_key_after: int,
    propagate: str,
) -> None:
    """Run the sample e-commerce stack (gateway, auth, products, cart, payment) on 127.0.0.1.

    Prints each service's URL, then "stack ready" once all of them listen, and runs until
    SIGINT or SIGTERM. Its checkout reproduces the scenario's bug when the token expires
    between the gateway's validation and payment's re-validation (try a short --ttl).
    """
    try:
        config = StackConfig(
            ports=ports,
            upstreams=upstreams,
            token_ttl=ttl,
            work_seconds=work_seconds,
            payment_clock_offset=payment_clock_offset,
            shared_client=shared_client,
            flaky_rate=flaky_rate,
            flaky_seed=flaky_seed,
            rate_limit=rate_limit,
            retry_no_backoff=retry_no_backoff,
            key_missing_caller=key_missing_caller,
            leak_internal_key=leak_internal_key,
            token_audience=token_audience,
            refresh_race=refresh_race,
            jwt_algorithm=jwt_algorithm,
            rotate_key_after=rotate_key_after,
            propagate=propagate,
        )
        asyncio.run(_serve(config))
    except StackError as exc:
        raise BadInput(str(exc)) from exc


async def _serve(config: StackConfig) -> None:
    # Handlers first: a signal during startup then stops the stack instead of killing it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    running = await start_stack(config)
    try:
        _announce(running)
        await stop.wait()
    finally:
        await running.stop()
    click.echo("stack stopped")


def _announce(running: RunningStack) -> None:
    width = max(map(len, SERVICES)) + 2
    for name in SERVICES:
        line = f"{name:<{width}}{running.urls[name]}"
        if running.upstreams[name] != running.urls[name]:
            line += f"  (reached via {running.upstreams[name]})"
        click.echo(line)
    click.echo("stack ready")


if __name__ == "__main__":
    stack(prog_name="hoptrace stack")


@click.command(cls=OneLineCommand)
@out_folder_option("out/demo", "Folder for the trace, the report and the charts.")
@click.option("--users", type=click.IntRange(2, 50), default=6, show_default=True,
              help="Concurrent users; one of them checks out as its token is about to expire.")  # fmt: skip
def demo(out: Path, users: int) -> None:
    """Run the bundled stack behind the proxy, drive the checkout flow, analyze and plot it.

    Five aiohttp services (gateway, auth, products, cart, payment) reproduce the
    scenario of a checkout that answers 401 although the token "validates":
    the trace, report.html and the charts land in one folder.

    \b
    Example:
        hoptrace demo --out out/demo --users 6
    """
    from hoptrace.stack.demo import closing_hint, run_demo

    with exit_2_on_bad_input():
        written = run_demo(out, users, click.echo)
    click.echo("[demo] files:")
    for path in written:
        click.echo(f"  {path}")
    click.echo(closing_hint(out))


@click.command("record-samples", cls=OneLineCommand)
@out_folder_option("sample_traces", "Folder for the trace files and their golden analyses.")
@click.option("--goldens-only", is_flag=True, help="Keep the recorded traces; only re-analyze them into the golden files.")
def record_samples(out: Path, goldens_only: bool) -> None:
    """Re-record every scenario of the sample stack, each with its golden `analyze --format json`.

    \b
    Example:
        hoptrace record-samples --out sample_traces
    """
    from hoptrace.stack.demo import record_samples as record_all

    with exit_2_on_bad_input():
        for path in record_all(out, click.echo, goldens_only=goldens_only):
            click.echo(f"  wrote {path}")
