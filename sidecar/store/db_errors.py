"""How the sidecar reads a PostgreSQL error: the one classification every store method goes through.

- unavailable: PostgreSQL cannot do anything for us right now; steps wait and `/readyz` says so. Connection
  errors (SQLSTATE class 08, a dropped socket), the server shutting down or refusing connections (57P0x),
  too many connections (53300), a pool that cannot hand out a connection, a read-only database (25006, as on
  a standby promoted late or with `default_transaction_read_only`), and a missing table or column (42P01,
  3F000, 42703: the sidecar schema is not migrated, or the mapping names something absent).
- slow: a statement ran past the timeout (the client's command timeout or the server's statement_timeout,
  57014); retried a bounded number of times by whoever can name the step, then failed.
- conflict: a deadlock or serialization abort; nothing was kept and a retry at once succeeds.
- own: anything else is the statement's own failure (a constraint on that row, bad data): never retried.
"""

from __future__ import annotations

from enum import StrEnum

import asyncpg

from sidecar.ports import StoreSlow, StoreUnavailable, TransientConflict

_E = asyncpg.exceptions

SCHEMA_ERRORS: tuple[type[BaseException], ...] = (
    _E.UndefinedTableError,
    _E.InvalidSchemaNameError,
    _E.UndefinedColumnError,
)
SLOW_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, _E.QueryCanceledError)
CONFLICT_ERRORS: tuple[type[BaseException], ...] = (_E.DeadlockDetectedError, _E.SerializationError)
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    _E.OperatorInterventionError,  # after SLOW_ERRORS: QueryCanceledError is one too
    _E.TooManyConnectionsError,
    _E.CannotConnectNowError,
    _E.ReadOnlySQLTransactionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # a pooled connection left in a broken protocol state
    _E.InvalidCatalogNameError,  # 3D000 at connect: the database does not exist (dropped, not created yet)
    _E.InvalidAuthorizationSpecificationError,  # 28xxx at connect: the role or password is refused
    *SCHEMA_ERRORS,
)
# Errors after which the pooled connections are not to be trusted: they are replaced.
RECONNECT_ERRORS: tuple[type[BaseException], ...] = (
    _E.ReadOnlySQLTransactionError,
    asyncpg.exceptions.InternalClientError,
)


class Fault(StrEnum):
    UNAVAILABLE = "unavailable"
    SLOW = "slow"
    CONFLICT = "conflict"
    OWN = "own"


def classify(error: BaseException) -> Fault:
    if isinstance(error, SLOW_ERRORS):
        return Fault.SLOW
    if isinstance(error, CONFLICT_ERRORS):
        return Fault.CONFLICT
    if isinstance(error, UNAVAILABLE_ERRORS):
        return Fault.UNAVAILABLE
    return Fault.OWN


def describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, SCHEMA_ERRORS):
        return f"{text} (the sidecar schema is missing or not migrated: run `wa-sidecar migrate`)"
    if isinstance(error, _E.ReadOnlySQLTransactionError):
        return f"{text} (the database is read-only: a standby, or default_transaction_read_only)"
    return text


def translated(error: BaseException) -> BaseException:
    """The port-level exception for a database error (the error itself when it is the statement's own)."""
    fault = classify(error)
    if fault is Fault.SLOW:
        return StoreSlow(f"statement timed out: {describe(error)}")
    if fault is Fault.CONFLICT:
        return TransientConflict(describe(error))
    if fault is Fault.UNAVAILABLE:
        return StoreUnavailable(describe(error))
    return error


def pool_exhausted(timeout: float) -> StoreUnavailable:
    return StoreUnavailable(f"no pooled connection within {timeout:g} s (pool exhausted or server unreachable)")


def failure_reason(error: BaseException) -> str:
    """A bounded label for a failed step (whatsapp_sidecar_steps_failed_total{reason})."""
    if isinstance(error, StoreSlow | TimeoutError):
        return "timeout"
    if isinstance(error, _E.IntegrityConstraintViolationError):
        return "integrity"
    if isinstance(error, _E.DataError):
        return "data"
    return "other"
