"""The registry's connection to its database: engine, SQLite settings and transactions.

SQLite runs in WAL mode with ``BEGIN IMMEDIATE`` transactions, so writers queue instead of
failing on lock upgrades; read-only transactions begin deferred, so they never take the write
lock. PostgreSQL URLs are normalised to the psycopg 3 driver, the only one fleetgate installs,
and connect with a timeout of :data:`CONNECT_TIMEOUT_S`, so an unreachable server fails a command
in seconds. :func:`unreachable` tells such failures from a query the database refused.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, create_engine

from fleetgate.errors import NotFound

_Row = TypeVar("_Row", bound=SQLModel)
_READ_ONLY = "fleetgate_read_only"
_MEMORY_URLS = frozenset({"sqlite://", "sqlite:///:memory:"})
_SQLITE_UNREACHABLE = ("unable to open database file", "database is locked", "disk i/o error")
CONNECT_TIMEOUT_S = 3
"""libpq's ``connect_timeout`` (whole seconds, at least 2) unless the URL sets its own."""


def normalise_url(url: str) -> str:
    """``postgres://`` and driverless ``postgresql://`` URLs name psycopg 3 explicitly.

    SQLAlchemy would otherwise pick psycopg2, which fleetgate does not install.
    """
    parsed = make_url(url)
    if parsed.drivername in {"postgres", "postgresql"}:
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def display_url(url: str) -> str:
    """``url`` as logs and errors may show it: without its password."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        return "(an unparsable database URL)"
    # URL.set(password=None) would keep the password: None there means "unchanged".
    return URL.create(
        parsed.drivername,
        username=parsed.username,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
        query=parsed.query,
    ).render_as_string(hide_password=False)


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database could not be reached (down, restarting, the network,
    a dropped connection), so the same work may succeed later, rather than a refused statement.

    sqlite3 raises OperationalError for missing tables and syntax errors too: only a file it
    cannot open or a lock it cannot get counts there.
    """
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    if isinstance(orig, sqlite3.Error):
        return isinstance(orig, sqlite3.OperationalError) and str(orig).lower().startswith(
            _SQLITE_UNREACHABLE
        )
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    return isinstance(exc, sa_exc.TimeoutError)


def failure_cause(exc: BaseException) -> str:
    """The driver's own one-line reason (e.g. "... failed: Connection refused")."""
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__


def create_registry_engine(url: str) -> Engine:
    """An engine with fleetgate's SQLite settings (WAL, FKs, IMMEDIATE transactions)."""
    url = normalise_url(url)
    if not url.startswith("sqlite"):
        own = make_url(url).query  # connect_args would override the URL's own setting
        timeout = {} if "connect_timeout" in own else {"connect_timeout": CONNECT_TIMEOUT_S}
        return create_engine(url, pool_pre_ping=True, connect_args=timeout)
    memory = url in _MEMORY_URLS
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        poolclass=StaticPool if memory else None,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # transactions are begun below, not by pysqlite
        cursor = dbapi_conn.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # Writers take the lock up front, so they queue rather than fail on a lock upgrade;
        # readers (marked by Database.read) do not block them.
        deferred = conn.info.pop(_READ_ONLY, False)
        # Straight to the driver: SQLAlchemy's own execute path costs more than the BEGIN.
        conn.connection.driver_connection.execute("BEGIN" if deferred else "BEGIN IMMEDIATE")

    return engine


@dataclass(frozen=True)
class Prepared:
    """A statement compiled once for SQLite's driver: its text, its parameters in order with
    their bind processors (enums stored by name, datetimes as text) and their defaults."""

    text: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    defaults: dict[str, Any]

    @classmethod
    def compile(cls, statement: Any, dialect: Any, keys: tuple[str, ...] = ()) -> Prepared:
        """``keys``: the columns an INSERT's parameter dictionaries name."""
        query = statement.compile(dialect=dialect, column_keys=list(keys) or None)
        names = tuple(query.positiontup or ())
        processors = tuple(query.binds[n].type.bind_processor(dialect) for n in names)
        defaults = {n: b.effective_value for n, b in query.binds.items() if not b.required}
        return cls(str(query), names, processors, defaults)

    def parameters(self, params: dict[str, Any]) -> list[Any]:
        merged = {**self.defaults, **params}
        return [
            merged[n] if p is None else p(merged[n])
            for n, p in zip(self.names, self.processors, strict=True)
        ]


class Cursorlike(Protocol):
    """What the lean statement path returns: sqlite3's cursor or SQLAlchemy's result."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...


class SqliteReader:
    """Plain sqlite3 connections (one per thread) for the read every broker CONNECT makes.

    SQLAlchemy's checkout, BEGIN and COMMIT around the ~10 µs indexed admission read cost
    ~140 µs. A single SELECT in autocommit mode reads one consistent WAL snapshot, so nothing is
    lost by skipping them. Rows come back raw: enum columns hold member *names*.
    """

    def __init__(self, engine: Engine) -> None:
        database = engine.url.database
        assert database is not None
        self._path = database
        self._dialect = engine.dialect
        self._local = threading.local()
        self._compiled: dict[object, Prepared] = {}
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def rows(self, statement: Any, params: dict[str, Any]) -> list[Any]:
        compiled = self._compiled.get(statement)
        if compiled is None:
            compiled = self._compiled[statement] = Prepared.compile(statement, self._dialect)
        return self._connection().execute(compiled.text, compiled.parameters(params)).fetchall()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self._path, timeout=30, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


class Database:
    """An open registry database: the engine, its transactions and the fast SQLite read path.

    The aggregate classes (stations, devices, attestation, broker reads, audit) build on it.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_registry_engine(url)
        file_sqlite = self.engine.dialect.name == "sqlite" and url not in _MEMORY_URLS
        self._fast_reads = SqliteReader(self.engine) if file_sqlite else None
        sqlite = self.engine.dialect.name == "sqlite"
        self._prepared: dict[object, Prepared] | None = {} if sqlite else None

    def close(self) -> None:
        if self._fast_reads is not None:
            self._fast_reads.close()
        self.engine.dispose()

    @property
    def reads_locally(self) -> bool:
        """Whether the database is local SQLite, whose :meth:`admission` and
        :meth:`changes_since` are cheap enough for an event loop; PostgreSQL's cross a network:
        ask in a thread."""
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: committed on success, rolled back (registry unchanged) on error."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only Core transaction (deferred on SQLite): the hot paths avoid the ORM."""
        with self.engine.connect() as conn:
            conn.info[_READ_ONLY] = True
            with conn.begin():
                yield conn

    @contextmanager
    def _read_session(self) -> Iterator[Session]:
        """An ORM session over a read-only transaction (deferred on SQLite: no write lock)."""
        with self._read() as conn, Session(bind=conn, expire_on_commit=False) as session:
            yield session

    def _get(self, model: type[_Row], key: str, missing: str) -> _Row:
        """The row of ``model`` with primary key ``key``; :class:`NotFound` saying ``missing``."""
        with self._read_session() as s:
            row = s.get(model, key)
        if row is None:
            raise NotFound(missing)
        return row

    def _fast_rows(self, statement: Any, params: dict[str, Any]) -> list[Any]:
        """Rows of a hot read: plain sqlite3 on a file database, else a read transaction."""
        if self._fast_reads is not None:
            return self._fast_reads.rows(statement, params)
        with self._read() as conn:
            return list(conn.execute(statement, params).all())

    @contextmanager
    def _savepoint(self, conn: Connection) -> Iterator[None]:
        """A unit inside ``conn``'s transaction that is rolled back alone if the block raises
        (the transaction goes on); on SQLite straight on the driver, like :meth:`_lean`."""
        if self._prepared is None:
            with conn.begin_nested():
                yield
            return
        driver = conn.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        driver.execute("SAVEPOINT fleetgate_item")
        try:
            yield
        except BaseException:
            driver.execute("ROLLBACK TO fleetgate_item")
            driver.execute("RELEASE fleetgate_item")
            raise
        driver.execute("RELEASE fleetgate_item")

    def _lean(self, conn: Connection, statement: Any, params: dict[str, Any]) -> Cursorlike:
        """Run a hot write-path statement in ``conn``'s transaction: on SQLite straight on the
        driver with the statement compiled once (SQLAlchemy's execute costs ~70 µs a statement,
        SQLite's ~10 µs), elsewhere through SQLAlchemy."""
        if self._prepared is None:
            return conn.execute(statement, params)
        key = (statement, tuple(params)) if statement.is_insert else statement
        prepared = self._prepared.get(key)
        if prepared is None:
            keys = tuple(params) if statement.is_insert else ()
            prepared = Prepared.compile(statement, self.engine.dialect, keys)
            self._prepared[key] = prepared
        driver = conn.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        return driver.execute(prepared.text, prepared.parameters(params))
