"""Fleet: one study measured by several hosts at once through a shared Optuna RDB storage (PostgreSQL).

The fleet is a storage concern: `FleetLedger` is the ledger (tuner.search.ledger) of such a study, and the
search's one loop (tuner.search.loop.Search) runs over it as over a study folder's; `ledger_for` chooses between
the two from the storage the options name. Every coordination goes through the storage; there is no scheduler of
tuner's own:

- Records: each host writes every TrialRecord into the table `tuner_records` of the same database (and into its
  own trials.parquet, its durable copy), and reads the others' records before each ask: pooling, OOM dominance,
  the planner's calibration, the confirmation and the recommendation see the whole fleet.
- Claims: a config is measured once. Before measuring, a host inserts (study, config) into `tuner_claims`; the
  primary key makes that atomic, so two hosts that drew the same config at the same moment never both measure it.
  The loser is told the winner's figure (a duplicate, as in a single-host search) or, while the winner is still
  measuring, FAIL (the sampler learns nothing from it; TPE runs with constant_liar so hosts spread out).
- Dead hosts: Optuna's heartbeat. While a trial runs a thread records its heartbeat; before every ask a host fails
  the stale trials (`optuna.storages.fail_stale_trials`) and RetryHeartbeatStaleTrialCallback enqueues their
  configs again; the claim of a FAIL trial passes to the retry. A record a dead host stored for a trial it never
  told is ignored: the config is measured again, and counted once.
- Budget: --n-trials is the study's total over all hosts (Optuna's meaning); trials running on other hosts count
  too, so the fleet stops at the budget (hosts that ask at the very same moment may overshoot by one each).
  --timeout is each host's own wall time. A host whose loop ends waits while trials still run elsewhere (one
  may die and need re-running); a host that joins a finished study says so and writes the recommendation.
- Like with like: the first host's hardware and build fingerprints found the study. A host with others is refused;
  with --allow-mixed it runs as a group of its own: a separate Optuna study NAME@HW.BUILD (own sampler history,
  budget, confirmation and recommendation), reported beside the others.
- Confirmation: run once per group and per search length, by the host that claims `confirm:<finished trials>`
  first after no trial runs anywhere any more; the claim carries a heartbeat, so a dead confirmer's claim passes on.

`snapshot()` writes a study of the storage as ordinary study folders (trials.parquet, study.db, recommended.json),
so `tuner recommend` and `tuner report` read a fleet through their one reading path.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import optuna
import pandas as pd
import sqlalchemy as sa

from tuner.measure import hardware, store
from tuner.record import TrialRecord, utcnow
from tuner.search import recommend as recommendlib
from tuner.search.ledger import (
    Elsewhere,
    Ledger,
    LocalLedger,
    StudyError,
    make_sampler,
    open_storage,
    open_study,
    redact,
)
from tuner.search.options import Limits, SearchOptions
from tuner.search.space import Space

GRACE_FACTOR = 3  # a host whose heartbeat is older than GRACE_FACTOR x --heartbeat is dead
RECORDS, CLAIMS = "tuner_records", "tuner_claims"
SNAPSHOT_FILE = "snapshot.json"
TS = optuna.trial.TrialState

# heartbeat_interval, fail_stale_trials and the retry callback are marked experimental in Optuna 5: they are the
# documented way to detect dead workers, and the warning would print on every host for every trial
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# ask/tell with a heartbeat is what Optuna's docs describe for workers outside Study.optimize (the heartbeat
# thread here does what optimize's does)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

META = sa.MetaData()
RECORDS_T = sa.Table(
    RECORDS,
    META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("base", sa.String(512), nullable=False, index=True),  # the --study name all groups share
    sa.Column("study", sa.String(512), nullable=False),  # the Optuna study (fingerprint group) it belongs to
    sa.Column("trial_number", sa.Integer),
    sa.Column("state", sa.String(32)),
    sa.Column("host", sa.String(256)),
    sa.Column("hw_fingerprint", sa.String(64)),
    sa.Column("build_fingerprint", sa.String(64)),
    sa.Column("record", sa.Text, nullable=False),  # TrialRecord.to_json()
    sa.Column("created", sa.DateTime, server_default=sa.func.now()),
)
CLAIMS_T = sa.Table(
    CLAIMS,
    META,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("owner", sa.String(256)),
    sa.Column("trial_number", sa.Integer),
    sa.Column("state", sa.String(64)),  # running/done; the founding fingerprint for the key "fingerprint"
    sa.Column("updated", sa.DateTime),
)


class FleetError(StudyError):
    """A fleet study that cannot be read or joined; one-line message."""


def host_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fingerprint(hw, build: dict) -> str:
    return f"{hw.fingerprint()}/{hardware.build_fingerprint(build)}"


def group_name(base: str, fp: str) -> str:
    hw_fp, build_fp = fp.split("/")
    return f"{base}@{hw_fp[:8]}.{build_fp[:8]}"


def retry_race(fn: Callable, attempts: int, step_s: float, lost: Callable[[Exception], bool]):
    """fn(), again after step_s, 2 × step_s, ... while it raises an error that `lost` says is a lost race (hosts
    starting together on an empty database both create the same tables), at most `attempts` times.

    Kept by hand rather than with tenacity: these are the only two retries in tuner, each a few lines, and a
    dependency more in every install (CI builds two venvs) buys nothing they need.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - `lost` decides; anything else is raised at once
            if attempt == attempts - 1 or not lost(e):
                raise
            time.sleep(step_s * (attempt + 1))


class Tables:
    """tuner's two tables beside Optuna's in the shared database: records and claims."""

    def __init__(self, engine: sa.engine.Engine, create: bool = True):
        self.engine = engine
        if create:  # hosts starting together race to create the tables; the losers retry
            retry_race(
                lambda: META.create_all(engine, checkfirst=True),
                5,
                0.2,
                lambda e: isinstance(e, sa.exc.SQLAlchemyError),
            )

    def add(self, base: str, study: str, host: str, rec: TrialRecord) -> int:
        with self.engine.begin() as c:
            res = c.execute(
                RECORDS_T.insert().values(
                    base=base,
                    study=study,
                    trial_number=rec.trial_number,
                    state=rec.state,
                    host=host,
                    hw_fingerprint=rec.hw_fingerprint,
                    build_fingerprint=rec.build_fingerprint,
                    record=rec.to_json(),
                )
            )
            return int(res.inserted_primary_key[0])

    def rows(self, base: str, study: str | None = None, after: int = 0) -> list[tuple[int, str, TrialRecord]]:
        q = (
            sa.select(RECORDS_T.c.id, RECORDS_T.c.host, RECORDS_T.c.record)
            .where(RECORDS_T.c.base == base, RECORDS_T.c.id > after)
            .order_by(RECORDS_T.c.id)
        )
        if study is not None:
            q = q.where(RECORDS_T.c.study == study)
        with self.engine.connect() as c:
            return [(i, h, TrialRecord.from_json(r)) for i, h, r in c.execute(q)]

    def claim(self, study: str, key: str, owner: str, trial_number: int | None = None, state: str = "") -> dict | None:
        """Take the claim: None when it is ours now, else the row that holds it (with its age in seconds)."""
        try:
            with self.engine.begin() as c:
                c.execute(
                    CLAIMS_T.insert().values(
                        study=study, key=key, owner=owner, trial_number=trial_number, state=state, updated=sa.func.now()
                    )
                )
            return None
        except sa.exc.IntegrityError:
            return self.get(study, key)

    def get(self, study: str, key: str) -> dict | None:
        q = sa.select(CLAIMS_T, sa.func.now(type_=sa.DateTime).label("now")).where(
            CLAIMS_T.c.study == study, CLAIMS_T.c.key == key
        )
        with self.engine.connect() as c:
            row = c.execute(q).mappings().first()
        if row is None:
            return None
        out = dict(row)
        # the database's clock on both sides: hosts' clocks may disagree
        out["age_s"] = (out.pop("now").replace(tzinfo=None) - out["updated"].replace(tzinfo=None)).total_seconds()
        return out

    def replace(self, held: dict, **values) -> bool:
        """Compare-and-set: take over `held` only if nobody changed it since it was read."""
        c_ = CLAIMS_T.c
        same_trial = (
            c_.trial_number.is_(None) if held["trial_number"] is None else c_.trial_number == held["trial_number"]
        )
        q = (
            CLAIMS_T.update()
            .where(
                c_.study == held["study"],
                c_.key == held["key"],
                c_.owner == held["owner"],
                c_.state == held["state"],
                same_trial,
            )
            .values(updated=sa.func.now(), **values)
        )
        with self.engine.begin() as c:
            return c.execute(q).rowcount == 1

    def touch(self, study: str, key: str, owner: str, **values) -> None:
        q = (
            CLAIMS_T.update()
            .where(CLAIMS_T.c.study == study, CLAIMS_T.c.key == key, CLAIMS_T.c.owner == owner)
            .values(updated=sa.func.now(), **values)
        )
        with self.engine.begin() as c:
            c.execute(q)


class Beat:
    """Calls `fn` every `interval` seconds in a thread while the block runs (a heartbeat)."""

    def __init__(self, fn: Callable[[], None], interval: float):
        self.fn, self.interval = fn, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.warned = False

    def _loop(self) -> None:
        while True:
            try:
                self.fn()
            except Exception as e:  # noqa: BLE001 - a database hiccup; the next beat retries
                if not self.warned:
                    print(f"warning: heartbeat failed: {redact(str(e).splitlines()[0])[:160]}", file=sys.stderr)
                    self.warned = True
            if self.stop.wait(self.interval):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def counts(rec: TrialRecord, state) -> bool:
    """Whether a stored record counts: a searched trial's only once Optuna was told (a dead host's record of a
    trial it never told is measured again elsewhere); an interrupted trial's FAIL is its own, told record."""
    if not rec.searched or rec.trial_number is None:
        return True
    return state == TS.COMPLETE or (state == TS.FAIL and rec.outcome == "interrupted")


class FleetLedger(Ledger):
    """A study in a shared storage that several hosts measure at once: see the module docstring for how they
    cooperate. The study folder keeps this host's trials.parquet (its durable copy of what it measured)."""

    shared = True

    def __init__(self, opts: SearchOptions):
        super().__init__(opts.study_dir)
        self.base = opts.study  # the --study name every fingerprint group shares
        self.host = host_label()
        self.heartbeat_s = opts.heartbeat_s
        self.tables: Tables | None = None
        self.backend: optuna.storages.RDBStorage | None = None
        self._last_id = 0
        self._pending: list[tuple[int, str, TrialRecord]] = []  # records of trials still RUNNING when read
        self._own: set[int] = set()

    @property
    def grace_s(self) -> int:
        return GRACE_FACTOR * self.heartbeat_s

    # -- joining -----------------------------------------------------------------------------------------------
    def open(self, opts: SearchOptions, space: Space, hw, build: dict) -> optuna.Study:
        """Join (or found) the study: the first host's fingerprints found it; a host of others is refused, or with
        --allow-mixed runs as a group of its own (`name` NAME@HW.BUILD). The storage is checked before anything
        is written."""
        url = opts.storage_url
        # hosts starting together on an empty database race to create Optuna's tables: the losers retry
        self.backend = retry_race(
            lambda: open_storage(
                url,
                heartbeat_interval=opts.heartbeat_s,
                grace_period=self.grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
            ),
            6,
            0.3,
            lambda e: (
                isinstance(e, StudyError)
                and any(s in str(e) for s in ("UniqueViolation", "already exists", "DuplicateTable", "IntegrityError"))
            ),
        )
        try:
            self.tables = Tables(self.backend.engine)
        except sa.exc.SQLAlchemyError as e:
            raise FleetError(
                f"cannot create tuner's tables in {redact(url)}: {redact(str(e).splitlines()[0])[:160]}"
            ) from None
        mine = fingerprint(hw, build)
        held = self.tables.claim(self.base, "fingerprint", self.host, state=mine)
        founder = mine if held is None else held["state"]
        self.name = self.base
        if founder != mine:
            if not opts.allow_mixed:
                raise FleetError(
                    f"study {self.base!r} is measured on hardware/build fingerprint {founder}, this host is {mine}: "
                    "trials compete only with trials of the same machine and build; pass --allow-mixed to run this "
                    "host as a separate group, or pick another --study"
                )
            self._check_base_space(space)
            self.name = group_name(self.base, mine)
        # hosts must not all draw the same start-up configs: each host samples with its own seed
        seed = (opts.seed * 1_000_003 + zlib.crc32(self.host.encode())) % 2**32
        sampler = make_sampler(opts.sampler, seed, space, opts.pareto, constant_liar=True)
        study = open_study(opts, space, storage=self.backend, sampler=sampler, name=self.name)
        hw_fp, build_fp = mine.split("/")
        attrs = study.user_attrs
        for k, v in (
            ("hw_fingerprint", hw_fp),
            ("build_fingerprint", build_fp),
            ("limits", dataclasses.asdict(opts.limits)),
        ):
            if k not in attrs:
                study.set_user_attr(k, v)
        store.check_writable(self.parquet)
        self.study = study
        return study

    def _check_base_space(self, space: Space) -> None:
        """A group of another fingerprint must search the same space as the study it stands beside."""
        try:
            base = optuna.load_study(study_name=self.base, storage=self.backend)
        except KeyError:
            return
        old = base.user_attrs.get("space")
        if old is not None and old != space.describe():
            raise FleetError(
                f"study {self.base!r} exists with another search space; re-run the same command to "
                "join it, or pick a new --study name"
            )

    def load(self) -> list[TrialRecord]:
        return self._absorb()

    def abandoned(self) -> list[optuna.trial.FrozenTrial]:
        """None: trials left RUNNING may be other hosts' live trials. Only stale ones (no heartbeat) are failed, and
        Optuna's retry callback enqueues their configs again."""
        optuna.storages.fail_stale_trials(self.study)
        return []

    # -- reading the fleet ---------------------------------------------------------------------------------------
    def _absorb(self) -> list[TrialRecord]:
        """Records stored since the last read that count (see counts()); other hosts' drift anchors stay out of
        this host's drift detection (drift is a matter of one machine)."""
        rows = self._pending + self.tables.rows(self.base, self.name, self._last_id)
        if rows:
            self._last_id = max(self._last_id, max(i for i, _, _ in rows))
        states = {t.number: t.state for t in self.study.get_trials(deepcopy=False)}
        keep, self._pending = [], []
        for row in rows:
            i, host, rec = row
            if i in self._own:
                continue
            if rec.searched and rec.trial_number is not None and states.get(rec.trial_number) == TS.RUNNING:
                self._pending.append(row)  # told in a moment, or failed as stale: decided at the next read
                continue
            if not counts(rec, states.get(rec.trial_number)):
                continue
            if rec.state == "anchor" and host != self.host:
                continue
            keep.append(rec)
        return keep

    def sync(self) -> list[TrialRecord]:
        """Fail dead hosts' trials (their configs are enqueued again), take in the others' records, count what runs
        and waits."""
        optuna.storages.fail_stale_trials(self.study)
        new = self._absorb()
        trials = self.study.get_trials(deepcopy=False, states=(TS.RUNNING, TS.WAITING))
        running = [t for t in trials if t.state == TS.RUNNING]
        self.others = Elsewhere(running=[t.params for t in running], waiting=len(trials) - len(running))
        return new

    def trial_state(self, number: int):
        sid = self.study._study_id
        return self.backend.get_trial(self.backend.get_trial_id_from_study_id_trial_number(sid, number)).state

    # -- while searching -----------------------------------------------------------------------------------------
    def claim(self, key: tuple, number: int, seen: dict[tuple, int]) -> int | None:
        """The claims table decides (an atomic insert): a claim whose trial is FAIL (a dead host's, or interrupted)
        passes to this trial (compare-and-set)."""
        ckey = "config:" + hashlib.sha1(repr(key).encode()).hexdigest()
        while True:
            held = self.tables.claim(self.name, ckey, self.host, number)
            if held is None or held["trial_number"] == number:
                return None
            if self.trial_state(held["trial_number"]) != TS.FAIL:
                return held["trial_number"]  # measured, or being measured, by another trial
            # its trial is FAIL (a dead host's, or interrupted): the config passes to this trial
            if self.tables.replace(held, owner=self.host, trial_number=number):
                return None

    def heartbeat(self, trial: optuna.Trial) -> Beat:
        return Beat(lambda: self.backend.record_heartbeat(trial._trial_id), self.heartbeat_s)

    @contextmanager
    def telling(self, number: int) -> Iterator[None]:
        try:
            yield
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            if not self.trial_state(number).is_finished():
                raise
            print(
                f"warning: trial #{number} was declared dead by another host (no heartbeat for {self.grace_s} s); "
                "its config is measured again",
                file=sys.stderr,
            )

    def add(self, rec: TrialRecord) -> None:
        super().add(rec)  # this host's Parquet first: its durable copy
        self._own.add(self.tables.add(self.base, self.name, self.host, rec))

    def wait_for_others(self, first: bool) -> None:
        if first:
            print(
                f"waiting for {len(self.others.running)} trial(s) running on other hosts (a host silent for "
                f"{self.grace_s} s is declared dead and its config measured again)",
                file=sys.stderr,
            )
        time.sleep(self.heartbeat_s)

    @contextmanager
    def confirming(self, n_done: int) -> Iterator[Callable[[], None] | None]:
        """One host of the group confirms (and measures the context ladder): the first to claim `confirm:<n_done>`
        once no trial runs any more. The claim carries a heartbeat, so a dead confirmer's claim passes on."""
        study, key = self.name, f"confirm:{n_done}"
        held = self.tables.claim(study, key, self.host, state="running")
        if held is not None:
            if held["state"] == "done":
                yield None
                return
            if held["age_s"] <= self.grace_s:
                print(
                    f"host {held['owner']} confirms the recommendation (`tuner recommend --storage ...` gives "
                    "the confirmed one when it is done)",
                    file=sys.stderr,
                )
                yield None
                return
            if not self.tables.replace(held, owner=self.host):
                yield None
                return
            print(f"host {held['owner']} stopped confirming: this host takes over", file=sys.stderr)
        complete = []
        with Beat(lambda: self.tables.touch(study, key, self.host), self.heartbeat_s):
            yield lambda: complete.append(True)
        if complete:
            self.tables.touch(study, key, self.host, state="done")


def ledger_for(opts: SearchOptions) -> Ledger:
    """The ledger the options name: a FleetLedger when the study lives in a storage the user gave (--storage), else
    the study folder's own (LocalLedger)."""
    if opts.allow_mixed and not opts.storage:
        raise FleetError("--allow-mixed needs a shared --storage (hosts of other fingerprints join the study there)")
    return FleetLedger(opts) if opts.storage else LocalLedger(opts.study_dir)


# -- reading a fleet study from any host -----------------------------------------------------------------------------
def groups(storage: optuna.storages.RDBStorage, base: str) -> list[str]:
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    return [n for n in names if n == base or n.startswith(base + "@")]


def snapshot(url: str, base: str, folder: str | os.PathLike, nest: bool = False) -> list[Path]:
    """Write study `base` of the storage as study folders (trials.parquet, study.db, recommended.json): `folder`
    itself, or one sub-folder per fingerprint group when there are several (or `nest`). Returns the folders."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _check_readable(url, base)
    storage = open_storage(url, skip_table_creation=True)
    try:
        try:
            names = groups(storage, base)
        except sa.exc.SQLAlchemyError:  # a database without Optuna's tables
            raise FleetError(f"no study named {base!r} in {redact(url)} (no Optuna storage there)") from None
        if not names:
            raise FleetError(f"no study named {base!r} in {redact(url)}")
        if not sa.inspect(storage.engine).has_table(RECORDS):
            raise FleetError(
                f"study {base!r} in {redact(url)} holds no tuner records (not made by `tuner search --storage`)"
            )
        tables = Tables(storage.engine, create=False)
        folder = Path(folder)
        out = []
        for name in names:
            gdir = folder / name if (nest or len(names) > 1) else folder
            _check_snapshot_folder(gdir)
            out.append(gdir)
        for name, gdir in zip(names, out):
            _write_group(storage, tables, url, base, name, gdir)
        return out
    finally:
        storage.engine.dispose()


def _check_readable(url: str, base: str) -> None:
    """A reader connects first, so an unreachable server or wrong credentials read as such (Optuna's storage wraps
    them in a generic commit error when it skips table creation) and no empty SQLite file is made."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :].split("?")[0]
        if path and path != ":memory:" and not Path(path).is_file():
            raise FleetError(f"no database at {path}")
    try:
        engine = sa.create_engine(url)
    except Exception as e:  # noqa: BLE001 - bad URL, missing driver
        raise FleetError(f"cannot open storage {redact(url)}: {redact(str(e).splitlines()[0])[:160]}") from None
    try:
        with engine.connect() as c:
            optuna_there = sa.inspect(c).has_table("studies")
    except Exception as e:  # noqa: BLE001 - unreachable server, wrong credentials
        raise FleetError(f"cannot open storage {redact(url)}: {redact(str(e).splitlines()[0])[:160]}") from None
    finally:
        engine.dispose()
    if not optuna_there:
        raise FleetError(f"no study named {base!r} in {redact(url)} (no Optuna storage there)")


def _check_snapshot_folder(gdir: Path) -> None:
    if (gdir / store.TRIALS_FILE).exists() and not (gdir / SNAPSHOT_FILE).exists():
        raise FleetError(f"{gdir} holds a study's own {store.TRIALS_FILE}: give an empty folder for the snapshot")
    store.writable_folder(gdir, "snapshot folder")


def _write_group(storage, tables: Tables, url: str, base: str, name: str, gdir: Path) -> None:
    study = optuna.load_study(study_name=name, storage=storage)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    recs = [rec for _, _, rec in tables.rows(base, name) if counts(rec, states.get(rec.trial_number))]
    for stale in (gdir / "study.db", gdir / recommendlib.RECOMMENDED_FILE):
        stale.unlink(missing_ok=True)
    if recs:
        store.write_frame(gdir / store.TRIALS_FILE, pd.DataFrame([r.to_row() for r in recs]))
    optuna.copy_study(
        from_study_name=name,
        from_storage=storage,
        to_storage=f"sqlite:///{(gdir / 'study.db').resolve()}",
        to_study_name=name,
    )
    attrs = study.user_attrs
    objective = attrs.get("objective", "tg")
    if recs:
        lim = attrs.get("limits") or {}
        rec = recommendlib.recommend(
            recs,
            hardware.from_dict(recs[0].hw),
            Limits(**lim),
            "tg" if objective.startswith("pareto") else objective,
            study=name,
            pareto=objective.startswith("pareto"),
        )
        if rec is not None:
            recommendlib.write(gdir / recommendlib.RECOMMENDED_FILE, rec)
    (gdir / SNAPSHOT_FILE).write_text(
        json.dumps(
            {"storage": redact(url), "study": name, "taken_utc": utcnow(), "records": len(recs), "trials": len(states)},
            indent=2,
        )
    )


def snapshot_for_cli(url: str | None, base: str | None, folder, nest: bool = False) -> list[Path]:
    """snapshot() for `tuner recommend/report --storage URL --study NAME`: bad input as a one-line FleetError;
    without a folder, a temp folder that lives as long as the process."""
    if not url or not base:
        raise FleetError("--storage and --study go together: the shared storage's URL and the study's name")
    if folder is None:
        folder = tempfile.mkdtemp(prefix="tuner-snapshot-")
        atexit.register(shutil.rmtree, folder, True)
        nest = True
    return snapshot(url, base, folder, nest)
