"""``python -m guest_sdk``: print the droplet's maintenance event, for shell scripts and cron.

Exit status (docs/sdk.md): 0 no event, 10 ``live_migrate``, 11 ``offline_migrate``, 12 another value,
1 an error (unreachable service, not a droplet, a malformed answer, a wait that timed out); 2 a bad flag
(click's usage error).

    python -m guest_sdk                      # prints the value, like curl; exit code says which
    python -m guest_sdk --json               # the details as one JSON object
    python -m guest_sdk --wait --timeout 3600    # block until an event is scheduled
    python -m guest_sdk --wait-clear         # block until it is over
    python -m guest_sdk --timeout 10         # never take longer than 10 s, whatever the server says
"""

from __future__ import annotations

import json
import sys

import click

from guest_sdk.client import DEFAULT_BASE_URL, DEFAULT_POLL_INTERVAL_S, DEFAULT_TIMEOUT_S, MaintenanceClient
from guest_sdk.errors import GuestSDKError, WaitTimeout
from guest_sdk.models import EventKind, MaintenanceEvent

EXIT_NONE = 0
EXIT_ERROR = 1
EXIT_LIVE_MIGRATE = 10
EXIT_OFFLINE_MIGRATE = 11
EXIT_OTHER = 12
EXIT_INTERRUPTED = 130

_EXIT_BY_KIND = {
    EventKind.NONE: EXIT_NONE,
    EventKind.LIVE_MIGRATE: EXIT_LIVE_MIGRATE,
    EventKind.OFFLINE_MIGRATE: EXIT_OFFLINE_MIGRATE,
    EventKind.OTHER: EXIT_OTHER,
}


def exit_code_for(ev: MaintenanceEvent) -> int:
    """The process exit status that stands for ``ev``'s kind."""
    return _EXIT_BY_KIND[ev.kind]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="droplet-live-migration", prog_name="python -m guest_sdk")
@click.option(
    "--url",
    envvar="GUEST_SDK_URL",
    default=DEFAULT_BASE_URL,
    show_default=True,
    help="Metadata service base URL (env GUEST_SDK_URL).",
)
@click.option(
    "--source-address",
    envvar="GUEST_SDK_SOURCE_ADDRESS",
    default=None,
    help="Local address to send from, on a multi-homed droplet (env GUEST_SDK_SOURCE_ADDRESS).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the details as one JSON object.")
@click.option("--wait", "wait_mode", flag_value="scheduled", help="Block until an event is scheduled.")
@click.option("--wait-clear", "wait_mode", flag_value="clear", help="Block until no event is scheduled.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0),
    default=None,
    help="Give up (exit 1) after this many seconds, retries included, in every mode. Default: a wait "
    "waits forever; a single reading gives up once its retries are spent (about a minute at most).",
)
@click.option(
    "--poll-interval",
    "poll_interval_s",
    type=click.FloatRange(min=0.01),
    default=DEFAULT_POLL_INTERVAL_S,
    show_default=True,
    help="Seconds between polls when the server cannot long-poll.",
)
@click.option(
    "--request-timeout",
    "request_timeout_s",
    type=click.FloatRange(min=0.01),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Read timeout of one request, in seconds.",
)
@click.option(
    "--attempts",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Attempts per request on transient failures (1 = no retry).",
)
def main(
    *,
    url: str,
    source_address: str | None,
    as_json: bool,
    wait_mode: str | None,
    timeout_s: float | None,
    poll_interval_s: float,
    request_timeout_s: float,
    attempts: int,
) -> None:
    """Print this droplet's maintenance event, as curl would; the exit status says which.

    \b
    0   no event
    10  live_migrate
    11  offline_migrate
    12  another value
    1   an error: unreachable service, not a droplet, a malformed answer, a wait that timed out
    """
    try:
        with MaintenanceClient(
            url,
            source_address=source_address,
            poll_interval_s=poll_interval_s,
            timeout_s=request_timeout_s,
            retry_attempts=attempts,
        ) as client:
            if wait_mode == "scheduled":
                ev = client.wait(timeout_s=timeout_s)
            elif wait_mode == "clear":
                ev = client.wait_until_clear(timeout_s=timeout_s)
            elif as_json:
                ev = client.details(timeout_s=timeout_s)
            else:
                ev = client.event(timeout_s=timeout_s)
    except WaitTimeout as e:
        click.echo(f"guest_sdk: timed out: {e}", err=True)
        sys.exit(EXIT_ERROR)
    except GuestSDKError as e:
        click.echo(f"guest_sdk: error: {e}", err=True)
        sys.exit(EXIT_ERROR)
    except ValueError as e:
        click.echo(f"guest_sdk: error: {e}", err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo(json.dumps(ev.to_json_dict(), sort_keys=True))
    elif ev.value:
        click.echo(ev.value)
    sys.exit(exit_code_for(ev))


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess in tests
    main(prog_name="python -m guest_sdk")
