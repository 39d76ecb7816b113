"""Reading a study folder for the report: trials.parquet (tuner.measure.store), study.db (Optuna), recommended.json,
verify.json (tuner verify)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna

from tuner.errors import TunerError
from tuner.measure import store
from tuner.record import TrialConfig, TrialRecord
from tuner.search.recommend import RECOMMENDED_FILE, read_verified

FORMATS = ("png", "svg", "pdf")
DEFAULT_MAP = ("n_gpu_layers", "n_ctx")
STUDY_DB = "study.db"
# Config fields that are the test shape or bookkeeping, not a tuning choice.
SHAPE_FIELDS = ("n_prompt", "n_gen", "n_depth", "repetitions", "warmup")


class ReportError(TunerError):
    """A study folder that cannot be reported on, or a bad option; one-line message."""


# ---------------------------------------------------------------------------------------------------------
# reading a study
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Study:
    path: Path
    label: str  # unique among the studies of one report; also the chart sub-folder
    records: list[TrialRecord]  # every row, drift anchors included
    recommended: dict | None
    optuna_trials: list | None = None  # optuna FrozenTrials, when the storage could be read
    optuna_note: str = ""  # why not
    verified: dict | None = None  # verify.json: the recommendation served and measured by a client

    @property
    def name(self) -> str:
        return next((r.study for r in self.records if r.study), self.path.name)

    @property
    def trials(self) -> list[TrialRecord]:
        """The study's own trials (drift-anchor re-measurements left out)."""
        return [r for r in self.records if r.searched]

    @property
    def anchors(self) -> list[TrialRecord]:
        return [r for r in self.records if r.state == "anchor"]

    @property
    def confirmations(self) -> list[TrialRecord]:
        """The confirmation's re-measurements of the best configs (state "confirm")."""
        return [r for r in self.records if r.state == "confirm"]

    @property
    def ok(self) -> list[TrialRecord]:
        return [r for r in self.trials if r.ok]

    @property
    def hw(self) -> dict:
        return next((r.hw for r in reversed(self.records) if r.hw), {})

    @property
    def build(self) -> dict:
        return next((r.build for r in reversed(self.records) if r.build), {})

    @property
    def ram_total(self) -> int | None:
        return self.hw.get("ram_total") or None

    @property
    def vram_total(self) -> int | None:
        return sum(g.get("vram_total") or 0 for g in self.hw.get("gpus") or []) or None

    @property
    def gpu_offload(self) -> bool:
        return bool(self.build.get("gpu_offload")) or any(r.config.n_gpu_layers > 0 for r in self.ok)

    @property
    def objective(self) -> str:
        return (self.recommended or {}).get("objective") or "tg"

    def stderr_first_line(self, r: TrialRecord) -> str:
        """First non-empty line the worker printed: the record's stderr tail, else logs/trial-NNNNN.log."""
        text = r.stderr_tail or ""
        if not text.strip() and r.trial_number is not None:
            log = self.path / "logs" / f"trial-{r.trial_number:05d}.log"
            try:
                text = log.read_text(errors="replace")
            except OSError:
                text = ""
        return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def load_study(path: str | os.PathLike, label: str | None = None) -> Study:
    p = Path(path)
    if not p.is_dir():
        raise ReportError(f"{path}: not a study folder (expected a folder written by `tuner search`)")
    recs = store.records(p)  # StoreError (one line) when trials.parquet is missing or unreadable
    if not recs:
        raise ReportError(f"{path} holds no trials")
    recommended = None
    rp = p / RECOMMENDED_FILE
    if rp.exists():
        try:
            recommended = json.loads(rp.read_text())
        except (OSError, ValueError) as e:
            raise ReportError(f"unreadable {rp}: {str(e).splitlines()[0][:120]}") from None
        if not isinstance(recommended, dict) or "config" not in recommended:
            raise ReportError(f'{rp} is not a recommendation written by tuner (no "config")')
    study = Study(path=p, label=label or p.name, records=recs, recommended=recommended, verified=read_verified(p))
    study.optuna_trials, study.optuna_note = _load_optuna(p, study.name)
    return study


def _load_optuna(p: Path, name: str) -> tuple[list | None, str]:
    db = p / STUDY_DB
    if not db.exists():
        return None, f"no Optuna storage ({STUDY_DB}) in {p}"

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = None
    try:
        # skip_table_creation: a report never writes to the study's storage
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}", skip_table_creation=True)
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        pick = name if name in names else (names[0] if len(names) == 1 else None)
        if pick is None:
            return None, f"no study named {name!r} in {db}"
        return optuna.load_study(study_name=pick, storage=storage).get_trials(deepcopy=True), ""
    except Exception as e:  # noqa: BLE001 - SQLAlchemy/Optuna raise many types for a bad or foreign file
        return None, f"cannot read {db}: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
    finally:
        if storage is not None:
            storage.engine.dispose()


def load_studies(paths: list[str | os.PathLike]) -> list[Study]:
    """Load every folder first (so bad input fails before anything is written); labels made unique."""
    if not paths:
        raise ReportError("no study folder given")
    seen: Counter = Counter()
    studies = []
    for path in paths:
        p = Path(path)
        label = _safe(p.resolve().name or "study")
        if seen[label]:
            label = _safe(f"{p.resolve().parent.name}-{label}")
        while seen[label]:
            label += "-2"
        seen[label] += 1
        studies.append(load_study(p, label))
    return studies


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-.") or "study"


# ---------------------------------------------------------------------------------------------------------
# small helpers shared by charts and text
# ---------------------------------------------------------------------------------------------------------
def model_label(path: str) -> str:
    name = Path(path).name.removesuffix(".gguf")
    return re.sub(r"-\d{5}-of-\d{5}$", "", name)


def xvalue(r: TrialRecord, param: str):
    """A config parameter as it ran (n_ctx 0 means n_prompt + n_gen + n_depth, as llama-bench)."""
    if param == "n_ctx":
        return r.config.effective_ctx()
    if param == "model":
        return model_label(r.config.model)
    v = getattr(r.config, param)
    return ",".join(v) if isinstance(v, tuple) else v


def mem_scale(values) -> tuple[float, str]:
    top = max((v for v in values if v), default=0)
    return (2**30, "GiB") if top >= 2 * 2**30 else (2**20, "MiB")


def fmt_ts(mean: float | None, sd: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {sd:.2f}" if sd is not None else f"{mean:.2f}"


def parse_utc(s: str) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(s) if s else None
    except ValueError:
        return None


def shape_label(recs: list[TrialRecord]) -> str:
    shapes = sorted({(r.config.n_prompt, r.config.n_gen, r.config.n_depth) for r in recs})
    return ", ".join(f"pp{p}/tg{g}" + (f"@d{d}" if d else "") for p, g, d in shapes)


def varying_fields(recs: list[TrialRecord]) -> list[str]:
    out = []
    for k in TrialConfig.__dataclass_fields__:
        if k in ("repetitions", "warmup"):
            continue
        if len({str(xvalue(r, k)) for r in recs}) > 1:
            out.append(k)
    return out
