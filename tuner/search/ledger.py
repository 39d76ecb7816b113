"""Where a search keeps its trials: the Optuna study it asks and tells, and the records of what ran.

A `Ledger` is a storage concern, as in Optuna one `Study` runs over any storage: the search's loop
(tuner.search.loop.Search) is one, and it calls only the public methods below. Two ledgers:

- `LocalLedger`: a study of one process (the host's measurement lock keeps any other off it): the study folder's
  trials.parquet and the SQLite Optuna study beside it (study.db).
- `tuner.search.fleet.FleetLedger`: a study that several hosts measure through one shared Optuna RDB storage
  (PostgreSQL): claims, heartbeats, the other hosts' records, fingerprint groups.

Every ledger keeps this host's records in the study folder's trials.parquet (a fleet host's durable copy). The
base class's methods are what holds for a study of one process; a shared ledger overrides them.
"""

from __future__ import annotations

import importlib.util
import re
import sqlite3
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import optuna
from sqlalchemy import event

from tuner.errors import TunerError
from tuner.measure import store
from tuner.record import TrialRecord, utcnow
from tuner.search.options import SAMPLERS, SearchOptions
from tuner.search.space import Space


class StudyError(TunerError):
    """A search that cannot start (bad storage URL, study mismatch); one-line message."""


def redact(url: str) -> str:
    """Storage URLs may carry passwords: never print, log or store them."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def make_sampler(
    name: str, seed: int, space: Space, multi: bool, constant_liar: bool = False
) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # multivariate: n_gpu_layers × n_ctx interact (the OOM wall is diagonal). Random start-up trials:
        # Optuna's 10 for big spaces, fewer for small grids, where the baselines already inform the model
        # (benchmarks/search_efficiency.py: 5 reached 97 % of a 64-config grid's best in 17 of 20 seeds
        # within 16 trials, 10 in 5 of 20).
        # constant_liar: with several hosts asking at once, running trials count as bad, so hosts spread out
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            constant_liar=constant_liar,
            n_startup_trials=min(10, max(5, space.size() // 16)),
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid() or {"_": [0]}, seed=seed)
    if name == "gp":
        if multi:
            raise StudyError("--sampler gp supports one objective; use tpe with --pareto")

        if importlib.util.find_spec("torch") is None:
            raise StudyError(
                "--sampler gp needs PyTorch, which is not installed (pip install torch), or use --sampler tpe"
            )
        return optuna.samplers.GPSampler(seed=seed)
    raise StudyError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")


def _sqlite_wal(dbapi_conn, _record) -> None:
    """SQLite in WAL mode with synchronous=NORMAL: a commit survives a crash of the process (SIGKILL), only a
    power cut may lose the last ones; every Optuna commit no longer waits for an fsync."""
    if isinstance(dbapi_conn, sqlite3.Connection):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()


def open_storage(url: str, **kwargs) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage, or a one-line StudyError (password redacted) for a bad URL or an unreachable server."""
    try:
        storage = optuna.storages.RDBStorage(url, **kwargs) if "://" in url else None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy raises many types for bad URLs / unreachable servers
        msg = redact(str(e).splitlines()[0])[:160]
        raise StudyError(f"cannot open storage {redact(url)}: {msg}") from None
    if storage is None:
        raise StudyError(f"bad storage URL {redact(url)!r} (expected e.g. sqlite:///path/study.db)")
    return storage


def objective_label(opts: SearchOptions) -> str:
    return "pareto:tg,mem" if opts.pareto else opts.objective


def open_study(
    opts: SearchOptions,
    space: Space,
    storage: optuna.storages.RDBStorage | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    name: str | None = None,
) -> optuna.Study:
    """The Optuna study `name` (default: opts.study) in the storage, made or resumed: a resume must search the same
    space for the same objective."""
    name = name or opts.study
    multi = opts.pareto
    directions = ["maximize", "minimize"] if multi else ["minimize" if opts.objective == "ttft" else "maximize"]
    storage = storage or open_storage(opts.storage_url)
    if storage.engine.dialect.name == "sqlite":
        event.listen(storage.engine, "connect", _sqlite_wal)
        storage.engine.dispose()  # connections made before the listener reconnect with it
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    exists = name in names
    if opts.resume and not exists:
        raise StudyError(f"--resume: no study named {name!r} in {redact(opts.storage_url)}")
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        directions=directions,
        sampler=sampler or make_sampler(opts.sampler, opts.seed, space, multi),
        load_if_exists=True,
    )
    if exists:
        old = study.user_attrs.get("space")
        if old is not None and old != space.describe():
            raise StudyError(
                f"study {name!r} exists with another search space; re-run the same "
                f"command to resume it, or pick a new --study name"
            )
        if study.user_attrs.get("objective") not in (None, objective_label(opts)):
            raise StudyError(f"study {name!r} exists with objective {study.user_attrs['objective']!r}")
    else:
        study.set_user_attr("space", space.describe())
        study.set_user_attr("objective", objective_label(opts))
        study.set_user_attr("created_utc", utcnow())
    return study


@dataclass
class Elsewhere:
    """What other hosts of a shared study were doing at the last sync (a study of one process: nothing)."""

    running: list[dict] = field(default_factory=list)  # the params of the trials running now
    waiting: int = 0  # trials waiting in the study's queue, which any host may take


class Ledger:
    """Where a search keeps its trials; the methods say what holds for a study of one process."""

    shared = False  # other hosts ask from this study: its queue, its budget and its confirmation are theirs too

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.parquet = self.folder / store.TRIALS_FILE
        self.study: optuna.Study | None = None
        self.name = ""  # the Optuna study the search asks and tells (a fleet group's NAME@HW.BUILD)
        self.others = Elsewhere()

    # -- opening ------------------------------------------------------------------------------------------------
    def open(self, opts: SearchOptions, space: Space, hw, build: dict) -> optuna.Study:
        """Make or resume the Optuna study (a bad storage or a mismatch raises StudyError before anything is
        written) and check the study folder can be written; sets `study` and `name`."""
        raise NotImplementedError

    def load(self) -> list[TrialRecord]:
        """The records so far (a resumed study's), each once."""
        raise NotImplementedError

    def abandoned(self) -> list[optuna.trial.FrozenTrial]:
        """Trials left RUNNING that nobody measures any more (a crashed run of this search): the loop records them
        as interrupted, or tells them from the record they got."""
        raise NotImplementedError

    # -- while searching ----------------------------------------------------------------------------------------
    def sync(self) -> list[TrialRecord]:
        """The records other hosts stored since the last sync, and `others` brought up to date. One process: none."""
        return []

    def claim(self, key: tuple, number: int, seen: dict[tuple, int]) -> int | None:
        """Claim config `key` for trial `number` before it is measured: None when it is this trial's, else the
        trial that measured it or measures it now (nothing is run then). One process: `seen` (config key → the
        trial that measured it first) holds every claim."""
        return seen.get(key)

    def heartbeat(self, trial: optuna.Trial) -> ContextManager:
        """Held while `trial` runs: a shared study learns from its absence that the host died. One process: nothing."""
        return nullcontext()

    def telling(self, number: int) -> ContextManager:
        """Held while trial `number` is told. A shared study may have declared it dead meanwhile (another host saw
        no heartbeat): that tell is dropped with a warning. One process: any error is raised."""
        return nullcontext()

    def add(self, rec: TrialRecord) -> None:
        """Store a record: this host's Parquet first (its durable copy)."""
        store.append(self.parquet, [rec])

    def mark_drift(self, since: int) -> None:
        """Mark this host's records of the trials after `since` (anchors aside) as measured during drift."""
        store.mark(
            self.parquet,
            "drift",
            True,
            lambda row: (
                row.get("trial_number") is not None and row["trial_number"] > since and row.get("state") != "anchor"
            ),
        )

    def wait_for_others(self, first: bool) -> None:
        """Wait a while (a heartbeat) for the trials running on other hosts, saying so the `first` time. One process:
        never called (nothing runs elsewhere)."""

    @contextmanager
    def confirming(self, n_done: int) -> Iterator[Callable[[], None] | None]:
        """The right to confirm the recommendation (and measure the context ladder) after `n_done` trials: yields a
        `done` callable when this host has it (call it once the confirmation and the ladder are complete), None
        when another host confirms. One process: always this one."""
        yield lambda: None

    def close(self) -> None:
        """Close the storage's connections: SQLite folds its write-ahead log back into study.db."""
        if self.study is not None:
            backend = getattr(self.study._storage, "_backend", self.study._storage)
            engine = getattr(backend, "engine", None)
            if engine is not None:
                engine.dispose()


class LocalLedger(Ledger):
    """A study of one process: the study folder's trials.parquet and the Optuna study in `storage` (default: the
    folder's study.db, or the options' --storage)."""

    def __init__(self, folder: str | Path, storage: optuna.storages.RDBStorage | None = None):
        super().__init__(folder)
        self.storage = storage

    def open(self, opts: SearchOptions, space: Space, hw, build: dict) -> optuna.Study:
        if opts.storage and self.storage is None:  # a storage of the user's: check it before anything is written
            self.storage = open_storage(opts.storage_url)
        store.check_writable(self.parquet)
        self.name = opts.study
        self.study = open_study(opts, space, self.storage, name=self.name)
        return self.study

    def load(self) -> list[TrialRecord]:
        return store.records(self.parquet) if self.parquet.exists() else []

    def abandoned(self) -> list[optuna.trial.FrozenTrial]:
        """Every trial left RUNNING: the measurement lock keeps any other process off this study."""
        return self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
