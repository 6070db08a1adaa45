"""The wall clock, in UTC, as the ledger and the state db record it. Its own
module so that the CLI can stamp ledger records without importing the
daemon's event loop (trio alone is half of a CLI command's start-up)."""

import datetime


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso_now() -> str:
    return utc_now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
