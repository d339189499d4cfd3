"""Column types that mean the same on MySQL/MariaDB and on SQLite.

MySQL gets the exact types of ``sql/schema.sql``; SQLite gets the closest
affinity, plus CHECK constraints (declared on the tables) where MySQL relies on
UNSIGNED.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, DateTime, Integer, SmallInteger
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

_MYSQL = ("mysql", "mariadb")

# SQLite only auto-increments an "INTEGER PRIMARY KEY", hence the variant.
Id = BigInteger().with_variant(Integer(), "sqlite")
RefId = BigInteger()
UInt = Integer().with_variant(mysql.INTEGER(unsigned=True), *_MYSQL)
SignedInt = Integer()
Flag = SmallInteger().with_variant(mysql.TINYINT(), *_MYSQL)
Timestamp3 = DateTime().with_variant(mysql.DATETIME(fsp=3), *_MYSQL)


class now3(FunctionElement):  # noqa: N801 - named as the SQL it renders, like SQLAlchemy's func.now
    """CURRENT_TIMESTAMP with milliseconds, usable as a server default.

    On SQLite it renders six fraction digits, the format SQLAlchemy itself
    writes, so stored and defaulted times compare correctly as text.
    """

    type = DateTime()
    inherit_cache = True


@compiles(now3)
def _now3_default(element, compiler, **kw):
    return "CURRENT_TIMESTAMP"


@compiles(now3, "mysql")
@compiles(now3, "mariadb")
def _now3_mysql(element, compiler, **kw):
    return "CURRENT_TIMESTAMP(3)"


@compiles(now3, "sqlite")
def _now3_sqlite(element, compiler, **kw):
    return "(strftime('%Y-%m-%d %H:%M:%f000', 'now'))"
