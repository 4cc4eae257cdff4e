"""A training run's configuration: TOML with a [model] table, a [train] table and one [[phases]] table per phase.

    [model]                 # MiniMaxConfig fields; vocab_size defaults to the tokenizer's, block_size to the
    n_layer = 4             # longest phase's seq_len
    [train]                 # TrainConfig fields
    out_dir = "out/run"
    [[phases]]              # PhaseConfig fields, run in order
    iters = 1000
    seq_len = 128
    batch_size = 16
    lr = 1e-3
    min_lr = 1e-4
    warmup_iters = 50

Any field can be overridden from the command line as `--model.n_layer 4`, `--train.lr=3e-4`-style dotted flags
(`--phases.0.iters 10` for one phase, `--phases.*.iters 10` for all, `--phases.N.FIELD` with N one past the last
to add a phase); values are parsed as TOML values (`4`, `3e-4`,
`true`, `"text"`, `["a", "b"]`), a bare word that is not valid TOML is taken as a string, and `none` means None.
An unknown key, in a file or on the command line, raises ValueError naming it.

The packaged configs (`minimax_gpt/configs/*.toml`, loaded with importlib.resources so the package runs without the
repository) are the source of truth; the repository's top-level `configs/` holds identical copies for users to read
and edit (a test keeps them identical). `load_run_config(None)` is the embedded default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from minimax_gpt.config import MiniMaxConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PARALLEL_MODES = ("none", "ddp", "fsdp")  # minimax_gpt.parallel.distributed.PARALLEL_MODES
DEFAULT_CONFIG = "default"


@dataclass
class PhaseConfig:
    """One training phase: its own length, batch shape, learning-rate schedule and frozen parameters.

    The schedule is nanoGPT's, restarted in every phase: linear warm-up lr * (i + 1) / (warmup_iters + 1) for the
    phase's first warmup_iters steps, then cosine decay from lr to min_lr over the rest of the phase."""

    iters: int
    seq_len: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_iters: int = 0
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes with requires_grad=False in this phase

    def __post_init__(self) -> None:
        _check_types(self, "phase")
        for name in ("iters", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"phase {name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"phase lr must be a finite number > 0, got {self.lr}")
        if not (0 <= self.min_lr <= self.lr):
            raise ValueError(f"phase min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if not 0 <= self.warmup_iters <= self.iters:
            raise ValueError(f"phase warmup_iters must be in [0, iters={self.iters}], got {self.warmup_iters}; when "
                             f"shortening phases lower it too (e.g. --phases.*.iters 3 --phases.*.warmup_iters 1)")

    def lr_at(self, i: int) -> float:
        """Learning rate of the phase's step i (0-based)."""
        if i < self.warmup_iters:
            return self.lr * (i + 1) / (self.warmup_iters + 1)
        decay_steps = self.iters - self.warmup_iters
        ratio = (i - self.warmup_iters) / decay_steps if decay_steps > 0 else 1.0
        coeff = 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0)))
        return self.min_lr + coeff * (self.lr - self.min_lr)


@dataclass
class TrainConfig:
    # --- where things go and come from -------------------------------------------------------------------------
    out_dir: str = "out"
    data: str | None = None  # text file, folder, .jsonl or .parquet; None -> the default corpus (stdlib .py sources)
    prepared: str | None = None  # a directory written by `minimax-gpt prepare`; overrides data
    tokenizer: str = "bytes"  # bytes | char | bpe | tiktoken | hf (see minimax_gpt.data.tokenizer)
    tokenizer_path: str | None = None  # tiktoken encoding name or .tiktoken file, or hf tokenizer directory
    tokenizer_vocab_size: int | None = None  # size of the BPE to train (tokenizer = "bpe")
    val_fraction: float = 0.1
    # --- running ---------------------------------------------------------------------------------------------
    seed: int = 1337
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA with bf16 support, else fp32) | fp32 | bf16 (autocast) | fp16 (CUDA)
    threads: int = 0  # torch.set_num_threads when > 0
    grad_accum_steps: int = 1  # micro-batches of the phase's batch_size per optimizer step
    loss_chunk_size: int = 0  # > 0: chunked cross-entropy over that many positions at a time (big vocabularies)
    parallel: str = "none"  # none | ddp | fsdp: shorthand for the [parallel] degrees; batch_size is global
    compile: bool = False  # torch.compile the training forward (one graph; the first steps pay the compile time)
    tune_malloc: bool = True  # CPU runs: glibc reuses freed heap for large tensors instead of fresh mmaps (hostmem)
    # --- optimizer -------------------------------------------------------------------------------------------
    weight_decay: float = 0.1  # on matrices only: not on norms, biases (1-D) nor embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    max_bad_steps: int = 10  # stop after this many consecutive non-finite steps (each skipped); 0 = never
    # --- reporting and saving ----------------------------------------------------------------------------------
    log_interval: int = 10  # steps between metrics.jsonl records (and progress-bar updates)
    eval_interval: int = 250  # steps between validations; 0 = only at the end
    # validation batches of the phase's batch_size x seq_len windows per evaluation, spread evenly over the whole
    # validation split (data.TokenDataset.eval_windows); >= 1 (`minimax-gpt eval --max-batches all`: every window)
    eval_batches: int = 200
    save_interval: int = 0  # steps between extra checkpoints; 0 = phase boundaries and the end only
    keep_checkpoints: int = 0  # keep only the newest N step-* checkpoints (deleted after each save); 0 = keep all
    stop_after: int | None = None  # stop (with a checkpoint) after this global step, as if interrupted
    tensorboard: bool = True  # when torch.utils.tensorboard imports (logged once when it does not)
    progress: bool = True  # tqdm progress bar on stderr
    sample_prompt: str = "\n"
    sample_tokens: int = 256
    sample_temperature: float = 0.8
    sample_top_k: int | None = 200

    def __post_init__(self) -> None:
        _check_types(self, "train")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision is {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"train.parallel is {self.parallel!r}; allowed: {', '.join(PARALLEL_MODES)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"train.val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("grad_accum_steps", "log_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("threads", "loss_chunk_size", "eval_interval", "save_interval", "keep_checkpoints",
                     "sample_tokens", "max_bad_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "sample_temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"train.{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ValueError(f"train.adam_eps must be > 0, got {self.adam_eps}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"train.stop_after must be None or >= 1, got {self.stop_after}")
        if self.sample_top_k is not None and self.sample_top_k < 1:
            raise ValueError(f"train.sample_top_k must be None or >= 1, got {self.sample_top_k}")


@dataclass
class ParallelConfig:
    """The [parallel] table: degrees of parallelism, each one named dimension of the device mesh
    (minimax_gpt.parallel.distributed); their product is the world size. -1 means "the rest of the world size" (one
    at most).

    dp_replicate: data-parallel replicas, each holding the whole model (DDP; with dp_shard > 1, HSDP's replicas).
    dp_shard: ranks that shard parameters, gradients and optimizer state among them (FSDP2).
    sp: ranks that split every sequence into contiguous slices (sequence parallelism, minimax_gpt.parallel.sequence);
        the innermost dimension. Parameters are replicated (DDP) or sharded with dp_shard (FSDP2) over it.
    ep: ranks that split each MoE layer's experts among them (expert parallelism, minimax_gpt.parallel.expert). Not a
        mesh dimension of its own: as in torchtitan it borrows the data-parallel ranks (groups of ep consecutive
        ranks), so it does not multiply the world size; ep alone means dp_shard = -1.
    `train.parallel = "ddp"` is shorthand for dp_replicate = -1, "fsdp" for dp_shard = -1; either composes with sp."""

    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        _check_types(self, "parallel")
        if self.ep < 1:
            raise ValueError(f"parallel.ep must be >= 1 (experts per rank = num_experts / ep); got {self.ep}")
        for name, value in self.degrees().items():
            if value != -1 and value < 1:
                raise ValueError(f"parallel.{name} must be >= 1, or -1 for the rest of the world size; got {value}")
        if list(self.degrees().values()).count(-1) > 1:
            raise ValueError("only one parallel degree may be -1 (the rest of the world size); got "
                             + ", ".join(f"parallel.{k} = {v}" for k, v in self.degrees().items()))

    def degrees(self) -> dict[str, int]:
        """Every degree by name, mesh dimensions in mesh order (outermost first) and then ep (which borrows ranks):
        a new kind of parallelism is one more field."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class RunConfig:
    """model: the [model] table as given (vocab_size and block_size may be left to `model_config`)."""

    model: dict[str, Any]
    train: TrainConfig
    phases: list[PhaseConfig]
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("a run needs at least one [[phases]] entry")
        if self.train.parallel != "none" and (self.parallel.dp_replicate, self.parallel.dp_shard) != (1, 1):
            raise ValueError(f"train.parallel = {self.train.parallel!r} and [parallel] degrees are both set; use the "
                             f"degrees (parallel.dp_replicate, parallel.dp_shard) or the shorthand, not both")
        self.model_config(vocab_size=self.model.get("vocab_size") or 256)  # validate the model fields now

    @property
    def total_iters(self) -> int:
        return sum(p.iters for p in self.phases)

    def model_config(self, vocab_size: int) -> MiniMaxConfig:
        """The MiniMaxConfig: vocab_size from the tokenizer unless [model] sets it (it may only be larger, e.g.
        padded to a multiple of 64); block_size defaults to the longest phase's seq_len."""
        d = dict(self.model)
        if d.get("vocab_size") is None:
            d["vocab_size"] = vocab_size
        elif d["vocab_size"] < vocab_size:
            raise ValueError(f"model.vocab_size ({d['vocab_size']}) is smaller than the tokenizer's ({vocab_size})")
        if d.get("block_size") is None:
            d["block_size"] = max(p.seq_len for p in self.phases)
        return MiniMaxConfig.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "train": dataclasses.asdict(self.train),
                "phases": [dataclasses.asdict(p) for p in self.phases], "parallel": dataclasses.asdict(self.parallel)}

    def to_resolved_dict(self) -> dict[str, Any]:
        """`to_dict()` with, after "model" (the [model] table as given), "model_resolved": every MiniMaxConfig field
        as the model will have it, and "model_derived": the names of the resolved fields that [model] leaves unset
        and that are derived (block_size from the phases, vocab_size from the tokenizer, the rest in
        MiniMaxConfig.__post_init__). vocab_size is known only once the tokenizer is built at train time, so unless
        [model] sets it, it is a sentence saying so, with the number when that is known without reading the data
        (the bytes tokenizer, or the meta.json of train.prepared)."""
        resolved = self.model_config(vocab_size=self.model.get("vocab_size") or 1)
        derived = [name for name in ("vocab_size", "block_size") if self.model.get(name) is None]
        derived += [name for name in resolved._derived if name not in derived]
        model_resolved = resolved.to_dict()
        if self.model.get("vocab_size") is None:
            model_resolved["vocab_size"] = self._vocab_size_note()
        d = self.to_dict()
        return {"model": d["model"], "model_resolved": model_resolved, "model_derived": derived,
                "train": d["train"], "phases": d["phases"], "parallel": d["parallel"]}

    def _vocab_size_note(self) -> str:
        known = None
        if self.train.prepared is not None:
            try:
                meta = json.loads((Path(self.train.prepared) / "meta.json").read_text())
                known = f"{meta['vocab_size']} in {self.train.prepared}"
            except (OSError, ValueError, TypeError, KeyError):
                pass
        elif self.train.tokenizer == "bytes":
            from minimax_gpt.data.tokenizer import ByteTokenizer

            known = f"{ByteTokenizer.vocab_size} for the bytes tokenizer"
        return "the tokenizer's, known at train time" + (f" ({known})" if known else "")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "RunConfig":
        """Build from a parsed TOML / JSON document; an unknown key raises ValueError naming it and `source`."""
        _reject_unknown(d, {"model", "train", "phases", "parallel"}, "", source)
        parallel = dict(d.get("parallel", {}))
        _reject_unknown(parallel, _field_names(ParallelConfig), "parallel.", source)
        model = dict(d.get("model", {}))
        _reject_unknown(model, _field_names(MiniMaxConfig), "model.", source)
        train = dict(d.get("train", {}))
        _reject_unknown(train, _field_names(TrainConfig), "train.", source)
        phases = d.get("phases", [])
        if not isinstance(phases, list) or not all(isinstance(p, dict) for p in phases):
            raise ValueError(f"{source}: phases must be a list of tables ([[phases]] in TOML)")
        for i, p in enumerate(phases):
            _reject_unknown(p, _field_names(PhaseConfig), f"phases.{i}.", source)
            missing = sorted(f.name for f in dataclasses.fields(PhaseConfig)
                             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                             and f.name not in p)
            if missing:
                raise ValueError(f"{source}: phases.{i} is missing {', '.join(missing)}")
        return cls(model=model, train=TrainConfig(**train), phases=[PhaseConfig(**p) for p in phases],
                   parallel=ParallelConfig(**parallel))


# --- loading ------------------------------------------------------------------------------------------------------
def packaged_configs() -> list[str]:
    """Names of the configs shipped inside the package."""
    root = resources.files("minimax_gpt") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def read_config_document(name_or_path: str | Path | None) -> tuple[dict[str, Any], str]:
    """(parsed TOML, source description) for a file path, a packaged config name, or None (the default)."""
    if name_or_path is None:
        name_or_path = DEFAULT_CONFIG
    path = Path(name_or_path)
    if path.is_file():
        return _parse_toml(path.read_text, str(path)), str(path)
    name = path.name[:-5] if path.name.endswith(".toml") else path.name
    if path.parent == Path(".") and name in packaged_configs():
        packaged = resources.files("minimax_gpt") / "configs" / f"{name}.toml"
        return _parse_toml(packaged.read_text, f"packaged config {name!r}"), f"packaged config {name!r}"
    raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a file nor a packaged config "
                            f"({', '.join(packaged_configs())})")


def _parse_toml(read: Callable[[], str], source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(read())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source}: not valid TOML ({e})") from None


def load_run_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None,
                    base: dict[str, Any] | None = None) -> RunConfig:
    """A RunConfig from a TOML file / packaged name (None: the default) or an already parsed `base` dict, with
    command-line overrides (see `parse_overrides`) applied on top."""
    if base is not None:
        doc, source = _deep_copy(base), "saved run config"
    else:
        doc, source = read_config_document(name_or_path)
    RunConfig.from_dict(doc, source)  # report unknown keys in the file as the file's
    for key, value in parse_overrides(overrides or []):
        apply_override(doc, key, value)
    return RunConfig.from_dict(doc, "command line")


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`["--model.n_layer", "4", "--train.lr=3e-4"]` -> [("model.n_layer", 4), ("train.lr", 0.0003)]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"unrecognized argument {arg!r}: overrides look like --model.n_layer 4 or "
                             f"--train.lr=3e-4")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"{arg} needs a value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        out.append((key, parse_value(raw)))
    return out


def parse_value(raw: str) -> Any:
    if raw.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_override(doc: dict[str, Any], key: str, value: Any) -> None:
    """Set `model.x`, `train.x`, `phases.N.x` or `phases.*.x` in a parsed config document, checking the key."""
    parts = key.split(".")
    section = parts[0]
    if section in ("model", "train", "parallel") and len(parts) == 2:
        known = _field_names({"model": MiniMaxConfig, "train": TrainConfig, "parallel": ParallelConfig}[section])
        if parts[1] not in known:
            raise ValueError(f"unknown key {key!r} (command line): {_suggest(parts[1], known)}")
        doc.setdefault(section, {})[parts[1]] = value
        return
    if section == "phases" and len(parts) == 3:
        phases = doc.get("phases", [])
        if parts[2] not in _field_names(PhaseConfig):
            raise ValueError(f"unknown key {key!r} (command line): {_suggest(parts[2], _field_names(PhaseConfig))}")
        if parts[1] == "*":
            targets = phases
        elif parts[1].isdigit() and int(parts[1]) < len(phases):
            targets = [phases[int(parts[1])]]
        elif parts[1] == str(len(phases)):  # one past the last: a new phase (its other fields must follow)
            phases.append({})
            doc["phases"] = phases
            targets = [phases[-1]]
        else:
            raise ValueError(f"{key}: no phase {parts[1]!r}; the config has {len(phases)} phase(s), numbered from 0 "
                             f"(phases.{len(phases)}.FIELD adds one)")
        for p in targets:
            p[parts[2]] = value
        return
    raise ValueError(f"unknown key {key!r} (command line): keys are model.FIELD, train.FIELD, parallel.FIELD, "
                     f"phases.N.FIELD or phases.*.FIELD")


# --- helpers ------------------------------------------------------------------------------------------------------
def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}


def _suggest(name: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=3)
    return f"did you mean {', '.join(close)}?" if close else f"known keys: {', '.join(sorted(known))}"


def _reject_unknown(d: Any, known: set[str], prefix: str, source: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{source}: {prefix.rstrip('.') or 'the document'} must be a table")
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key {prefix + unknown[0]!r}" +
                         (f" (and {', '.join(prefix + u for u in unknown[1:])})" if unknown[1:] else "") +
                         f"; {_suggest(unknown[0], known)}")


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


_SIMPLE_TYPES = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,)}


def _check_types(obj: Any, prefix: str) -> None:
    """Check each field against its annotation (int, float, str, bool, X | None, list[str]); ints become floats
    where a float is expected. Raises TypeError naming the field."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        type_str = str(f.type).replace(" ", "")
        optional = type_str.endswith("|None")
        base = type_str.removesuffix("|None")
        if value is None and optional:
            continue
        if base == "list[str]":
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise TypeError(f"{prefix}.{f.name} must be a list of strings, got {value!r}")
            continue
        allowed = _SIMPLE_TYPES[base]
        if isinstance(value, bool) and base != "bool" or not isinstance(value, allowed):
            raise TypeError(f"{prefix}.{f.name} must be {base}{' or None' if optional else ''}, "
                            f"got {type(value).__name__} {value!r}")
        if base == "float":
            setattr(obj, f.name, float(value))
