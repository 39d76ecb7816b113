"""A search's options as one object, from the command line (tuner/cli/search.py) to the loop (tuner.search.loop).

`SearchOptions` is everything `tuner search` takes, by the names of its options: the test shape and the space's
specs, the budget, the limits, the confirmation, the quality budget, the storage and the fleet's knobs. Its
defaults are the command's (the Click options read them from `DEFAULTS`); `run_search` takes one and keyword
overrides, and the loop reads the same object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from tuner.measure.runner import DEFAULT_LOAD_TIMEOUT, DEFAULT_TIMEOUT
from tuner.search.confirm import DEFAULT_K, MAX_ROUNDS, MIN_ROUNDS
from tuner.units import parse_headroom

# *_stream: one of the --parallel N sequences (without --parallel the same as tg, pp, mixed); tg, pp and mixed
# are then all N together
OBJECTIVES = ("tg", "pp", "ttft", "mixed", "tg_stream", "pp_stream", "mixed_stream")
SAMPLERS = ("tpe", "random", "grid", "gp")
DEFAULT_PER_LOAD = 4
DEFAULT_HEADROOM = 1 << 30  # left free for the OS and the display (WDDM reserves VRAM on Windows)
DEFAULT_N_TRIALS = 20  # without --n-trials, --timeout or the grid sampler


@dataclass
class Limits:
    """Constraints a recommendation must meet (`tuner search` and `tuner recommend`)."""

    min_ctx: int = 0
    max_vram: int | None = None
    max_ram: int | None = None
    headroom: int | float = DEFAULT_HEADROOM


@dataclass
class SearchOptions:
    """`tuner search`'s options, named as its Click parameters. Every llama.cpp parameter of the space (TrialConfig
    names: n_gpu_layers="0:61", n_ctx="4096,8192", use_mmap, ...) is in `specs`: a value, a list or a range."""

    # what is measured: the models' source, the space, the test shape
    synthetic: str | None = None  # no model at hand: make this preset (tuner.model.synth) into RESULTS/models
    quants: str = "q8_0,q4_k_m"  # the quants made with `synthetic`
    specs: dict[str, object] = field(default_factory=dict)
    auto_space: bool = True  # every parameter left unset that matters gets the default space's range
    n_prompt: int | None = None
    n_gen: int | None = None
    n_depth: int | None = None
    repetitions: int | None = None
    # where the study lives
    study: str | None = None  # default: from the first model's file name (tuner.search.run.study_name)
    results: str | Path = "results"  # the study folder is RESULTS/<study>/
    storage: str | None = None  # an Optuna storage URL; a shared one makes a fleet (tuner.search.fleet)
    resume: bool = False
    # the sampler and the budget
    sampler: str = "tpe"
    seed: int = 0
    n_trials: int | None = None  # the study's total (a fleet: over all hosts)
    timeout: float | None = None  # seconds of this host's wall time, the confirmation included
    objective: str = "mixed"
    pareto: bool = False
    # the limits a recommendation meets (`limits`)
    min_ctx: int = 0
    max_vram: int | None = None
    max_ram: int | None = None
    headroom: int | float | str = "1GiB"  # a size or a share (tuner.units.parse_headroom)
    # how trials run
    trial_timeout: float = DEFAULT_TIMEOUT
    load_timeout: float = DEFAULT_LOAD_TIMEOUT
    mem_limit: int | None = None
    reuse_workers: bool = True
    per_load: int = DEFAULT_PER_LOAD  # configs measured in a row per model load (Search.after_load)
    plan: bool = True  # skip configs the memory planner predicts cannot fit
    baselines: bool = True
    prior: bool = True  # tuner.search.prior: the predicted best measured first (where this rig has a probe)
    probe: str | None = None  # the probe file it predicts from (default: this machine's and build's)
    drift_every: int = 10
    drift_tolerance: float = 0.05
    no_wait: bool = False  # fail instead of waiting for the host's measurement lock
    lock_file: str | None = None
    # the confirmation: top configs re-measured against the baseline before recommending (0: none)
    confirm: int = DEFAULT_K
    confirm_rounds: int = MAX_ROUNDS  # the race's round limit (its minimum: tuner.search.confirm.MIN_ROUNDS)
    # quality (tuner.quality): each model file's KL divergence from the reference, and the budget
    quality: bool = True
    reference: str | None = None
    reference_logits: str | None = None
    quality_text: str | None = None
    quality_ctx: int | None = None
    max_kld: float | None = None  # default: tuner.quality.DEFAULT_MAX_KLD
    min_same_top: float | None = None
    # a fleet: several hosts on one shared storage
    allow_mixed: bool = False  # hosts of another hw/build fingerprint join as a separate group
    heartbeat_s: int = 10  # a host silent for GRACE_FACTOR x this long is dead; its trial is run again
    # llama.cpp RPC servers whose devices join this host's GPUs (llama-server --rpc): "host:port,host:port"
    rpc: str | None = None
    # llama-server's --fit-target: MiB its --fit leaves free per device, for the --fit baseline ("1024" or one per
    # device, "512,2048")
    fit_target: str = "1024"
    # a dry run: the space and the planner's verdicts, nothing measured; `gpus`/`ram` describe another rig
    dry_run: bool = False
    gpus: list[int] | None = None
    ram: int | None = None

    @classmethod
    def from_params(cls, params: dict) -> SearchOptions:
        """The options from keyword arguments named as `tuner search`'s (Click's params): a field by its name,
        any other name a llama.cpp parameter of the space (into `specs`)."""
        return cls().replace(**params)

    def replace(self, **changes) -> SearchOptions:
        """A copy with these changes; names that are no field are the space's specs (merged into `specs`)."""
        names = {f.name for f in dataclasses.fields(self)}
        extra = {k: v for k, v in changes.items() if k not in names}
        out = dataclasses.replace(self, **{k: v for k, v in changes.items() if k in names})
        out.specs = {**out.specs, **extra}  # never the caller's dict: options are values
        return out

    @property
    def shape(self) -> dict[str, int]:
        """The test shape set (n_prompt, n_gen, n_depth, repetitions); the rest keeps TrialConfig's defaults."""
        return {k: v for k in ("n_prompt", "n_gen", "n_depth", "repetitions") if (v := getattr(self, k)) is not None}

    @property
    def limits(self) -> Limits:
        return Limits(
            min_ctx=self.min_ctx, max_vram=self.max_vram, max_ram=self.max_ram, headroom=parse_headroom(self.headroom)
        )

    @property
    def confirm_range(self) -> tuple[int, int]:
        """The confirmation race's rounds: its minimum and the limit."""
        return MIN_ROUNDS, self.confirm_rounds

    @property
    def study_dir(self) -> Path:
        if self.study is None:
            raise ValueError("SearchOptions.study is not set: the study folder is RESULTS/<study>/")
        return Path(self.results) / self.study

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.study_dir / 'study.db').resolve()}"


DEFAULTS = SearchOptions()
