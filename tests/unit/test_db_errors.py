"""What a database error means to a batch: the database's state (back off, roll back, no row blamed) or
one row's fault (isolated, its attempt counted). A cluster node that is joining, a server going down
or a connection cut must never be blamed on the rows: with short retry delays they would run out of
attempts and end 1/0 (stock never given back) while the database was only away."""

from __future__ import annotations

import pymysql
import pytest
from sqlalchemy import exc as sa_exc

from cancel_scanner.engine.errors import is_transient_db_error
from cancel_scanner.engine.writes import LostClaim, is_row_fault


def db_error(code: int, message: str) -> sa_exc.DBAPIError:
    """The error SQLAlchemy raises for a MariaDB error ``code``, as pymysql classifies it."""
    orig = pymysql.err.OperationalError(code, message) if code >= 1000 else pymysql.err.InternalError(code, message)
    if code in (1048, 1062, 1451, 1452, 4025):
        orig = pymysql.err.IntegrityError(code, message)
    elif code in (1264, 1406):
        orig = pymysql.err.DataError(code, message)
    return sa_exc.DBAPIError.instance("UPDATE goods SET stock = stock + 1", {}, orig, pymysql.err.Error)


@pytest.mark.parametrize(
    "code, message",
    [
        (1047, "WSREP has not yet prepared node for application use"),
        (1053, "Server shutdown in progress"),
        (1180, "Got error 6 during COMMIT"),
        (1317, "Query execution was interrupted"),
        (1159, "Got timeout reading communication packets"),
        (1213, "Deadlock found when trying to get lock; try restarting transaction"),
        (2013, "Lost connection to MySQL server during query"),
    ],
)
def test_the_databases_own_state_is_transient_and_never_a_rows_fault(code, message):
    error = db_error(code, message)
    assert is_transient_db_error(error)
    assert not is_row_fault(error)


@pytest.mark.parametrize(
    "code, message",
    [
        (1644, "the shop's trigger refuses this order"),  # SIGNAL SQLSTATE '45000'
        (4025, "CONSTRAINT `stock_not_negative` failed"),
        (1452, "Cannot add or update a child row: a foreign key constraint fails"),
        (1406, "Data too long for column 'detail'"),
    ],
)
def test_a_refusal_of_one_rows_write_is_that_rows_fault(code, message):
    error = db_error(code, message)
    assert not is_transient_db_error(error)
    assert is_row_fault(error)


def test_a_lost_claim_is_the_batchs_not_a_rows():
    assert not is_row_fault(LostClaim("intake: 200 rows claimed, 199 still ours"))
