"""The trainer's configuration: one dataclass per section, named presets, files, dotted overrides.

    from llama_mini.training.config import TrainConfig, load_config
    cfg = load_config(preset="debug", files=["my.toml"], overrides=["--model.dim", "128"])
    cfg.model.dim, cfg.data.policy, cfg.optim.lr, cfg.schedule.steps, cfg.parallel.model

Sections (``llama-mini train --help`` (or ``python train.py --help``) lists every option with its meaning):

    model     ``ModelArgs`` (llama_mini.config), plus ``model.preset``: the ModelArgs preset the
              section starts from. ``model.vocab_size`` -1 means "the tokenizer's, rounded up".
    data      sources, tokenizer, sequence-length policy and its options, batch size, shuffling
    optim     AdamW and gradient clipping
    schedule  steps, warmup, decay, gradient accumulation
    run       output directory, seed, device, precision, compile, evaluation, checkpoints, resume
    parallel  model-parallel size, process-group backend, collective timeout
    logging   progress bar, log interval, JSONL metrics, TensorBoard, Weights & Biases, plots

Precedence, lowest first: the dataclass defaults, the named preset (``--preset``), config files
(``--config a.toml --config b.json``; later files win), then dotted command-line overrides
(``--model.dim 512 --data.policy pad+impute``). Within the model section, ``model.preset`` is
applied before the other model fields wherever it is given. Every value is checked before any
work starts, and an error names the field and what it accepts.

Each field's meaning is the trailing comment on its line here; ``field_docs`` reads them, so the
help text and this file cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import os
import textwrap
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

from ..config import PRESETS as MODEL_PRESETS
from ..config import ModelArgs, RopeScaling

__all__ = [
    "ConfigError", "DataConfig", "OptimConfig", "ScheduleConfig", "RunConfig", "ParallelConfig",
    "LoggingConfig", "TrainConfig", "TRAIN_PRESETS", "SECTIONS", "load_config", "field_docs",
    "option_table", "coerce_field",
]


class ConfigError(ValueError):
    """An invalid configuration value, unknown option or unreadable config file."""


@dataclass
class DataConfig:
    """What the model reads."""

    train: list[str] = field(default_factory=list)  # training sources: files, dirs, globs, http(s) URLs (comma-separated); empty = built-in default data
    val: list[str] = field(default_factory=list)  # validation sources; empty = built-in default data's val split when train is empty, else no validation
    tokenizer: str = ""  # SentencePiece .model file; empty = the built-in default data's tokenizer
    policy: str = "pad+impute"  # sequence-length policy (see data.POLICIES)
    max_len: int = 0  # tokens per training sequence; 0 = model.max_seq_len
    tolerance: int = 0  # 'informed' policy only: shortest overflow worth keeping (tokens)
    pack_buffer: int = 1000  # 'best-fit' / 'packed-docmask' only: pieces held while packing
    val_policy: str = "impute"  # policy for validation batches, fixed so runs with different training policies are compared on the same tokens
    batch_size: int = 16  # sequences per micro-batch on each data-parallel rank
    streams: int = 0  # independent data streams (reader shards); 0 = the data-parallel size. Equal streams and equal global batch give the same data for any process layout
    shuffle: bool = True  # shuffle shard order and documents (bounded buffer) per epoch
    shuffle_buffer: int = 10000  # documents held by the shuffle buffer
    seed: int = 0  # data shuffle seed
    include_sets: list[str] = field(default_factory=list)  # keep only these Pile sets (meta.pile_set_name); empty = all
    exclude_sets: list[str] = field(default_factory=list)  # drop these Pile sets
    max_documents: int = 0  # stop each stream after this many documents per epoch; 0 = no limit
    on_error: str = "raise"  # bad JSON / text line: raise (naming file and line) or skip (counted)
    default_vocab: int = 4096  # vocabulary of the built-in default data's tokenizer


@dataclass
class OptimConfig:
    """AdamW: decoupled weight decay on matrices only."""

    lr: float = 3e-3  # peak learning rate (after warmup)
    weight_decay: float = 0.1  # AdamW weight decay, applied to matrices (linears, embedding) only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping (norm still logged)


@dataclass
class ScheduleConfig:
    """How long, and how the learning rate moves."""

    steps: int = 600  # optimizer steps in the whole run
    warmup_steps: int = -1  # linear warmup steps; -1 = 5% of schedule.steps
    decay: str = "cosine"  # learning-rate decay after warmup: cosine | linear | constant
    min_lr_ratio: float = 0.1  # the floor the decay ends at, as a fraction of optim.lr
    grad_accum: int = 1  # micro-batches per optimizer step on each data-parallel rank


@dataclass
class RunConfig:
    """Where, on what, and the bookkeeping around training."""

    name: str = "debug"  # run name; outputs go to out_dir/name
    out_dir: str = "runs"  # parent directory of run directories
    seed: int = 0  # seed of weight init (same on every rank) and of the training RNG
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling); weights stay fp32
    compile: bool = False  # torch.compile the model
    eval_interval: int = 100  # steps between validation passes; 0 = only at the end
    eval_batches: int = 20  # validation batches per pass, in all (split over data-parallel ranks)
    checkpoint_interval: int = 200  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 3  # keep the newest K checkpoints
    resume: str = "auto"  # auto (latest checkpoint of this run, if any) | never | a checkpoint directory
    init_from: str = ""  # start a new run from these weights: a Meta checkpoint directory (any shard count; not resumed state)
    stop_at: int = 0  # stop after this step with a checkpoint, as if interrupted (0 = run to schedule.steps)
    on_nonfinite: str = "stop"  # loss or gradient becomes NaN/inf: stop (last good checkpoint kept) | skip (drop the step)
    max_skips: int = 10  # with on_nonfinite=skip: stop when more than this many steps in a row are skipped
    sample_prompt: str = "The meaning of life is"  # prompt of the sample generated at the end; empty = none
    sample_tokens: int = 48  # tokens generated for the sample
    sample_temperature: float = 0.8  # sampling temperature (0 = greedy)


@dataclass
class ParallelConfig:
    """Process layout under torchrun: world = model x data."""

    model: int = 1  # model-parallel size (fairscale); the data-parallel size is world_size / model
    backend: str = "auto"  # process-group backend: auto (nccl on cuda, gloo on cpu) | gloo | nccl
    timeout_s: float = 300.0  # seconds a collective waits for the other ranks before failing


@dataclass
class LoggingConfig:
    """What the run shows and records."""

    log_interval: int = 10  # steps between metric records and (without a progress bar) log lines
    progress: bool = True  # tqdm progress bar on rank 0 when stderr is a terminal
    tensorboard: bool = False  # also write TensorBoard events to the run directory (needs tensorboard)
    wandb: bool = False  # also log to Weights & Biases (needs wandb)
    wandb_project: str = "llama-mini"  # W&B project
    wandb_mode: str = "offline"  # W&B mode: offline | online | disabled
    plot: bool = True  # write loss.png at each evaluation and at the end (needs matplotlib)


@dataclass
class TrainConfig:
    """Everything a training run needs."""

    model: ModelArgs = field(default_factory=lambda: ModelArgs.preset("debug", vocab_size=-1))  # the model
    data: DataConfig = field(default_factory=DataConfig)  # the data
    optim: OptimConfig = field(default_factory=OptimConfig)  # the optimizer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the schedule
    run: RunConfig = field(default_factory=RunConfig)  # the run
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # parallelism
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # logging
    model_preset: str = "debug"  # the ModelArgs preset the model section starts from (given as model.preset)

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["model"] = {"preset": self.model_preset, **out["model"]}
        return out

    def warmup_steps(self) -> int:
        """schedule.warmup_steps, with -1 resolved to 5% of the steps."""
        w = self.schedule.warmup_steps
        return max(1, round(0.05 * self.schedule.steps)) if w == -1 else w

    def run_dir(self) -> str:
        return os.path.join(self.run.out_dir, self.run.name)

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first field whose value is not allowed."""
        _validate(self)


SECTIONS: dict[str, type] = {
    "model": ModelArgs, "data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
    "run": RunConfig, "parallel": ParallelConfig, "logging": LoggingConfig,
}

# Named presets: dotted overrides applied over the defaults. ``debug`` is what ``python
# train.py`` runs: the debug model on the built-in data, a few minutes on two CPU cores.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "debug": {},
    "homework": {  # the reference homework's model (dim 512, 8 layers, 8 heads), batch 8
        "model.preset": "homework", "model.max_seq_len": 256, "data.batch_size": 8, "optim.lr": 1e-3,
        "schedule.steps": 2000, "schedule.warmup_steps": 100, "run.name": "homework",
    },
    "tinyllama-1.1b": {  # ~1.1B parameters at sequence 2048 in bf16, for one large GPU
        "model.preset": "tinyllama-1.1b", "model.activation_checkpointing": False, "data.batch_size": 8,
        "optim.lr": 4e-4, "schedule.steps": 10000, "schedule.warmup_steps": 500, "run.precision": "bf16",
        "run.name": "tinyllama-1.1b", "run.eval_interval": 500, "run.checkpoint_interval": 1000,
    },
}

# Choices of string fields, checked by validate (policies come from the data registry).
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.on_error": ("raise", "skip"),
    "schedule.decay": ("cosine", "linear", "constant"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.precision": ("fp32", "bf16", "fp16"),
    "run.on_nonfinite": ("stop", "skip"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
}


# Smallest allowed value of numeric fields, checked by validate.
_LOWER_BOUNDS: dict[str, int] = {
    **dict.fromkeys((
        "data.batch_size", "data.shuffle_buffer", "data.pack_buffer", "data.default_vocab", "schedule.steps",
        "schedule.grad_accum", "run.eval_batches", "run.keep_checkpoints", "run.max_skips", "parallel.model",
        "logging.log_interval",
    ), 1),
    **dict.fromkeys((
        "data.max_len", "data.tolerance", "data.streams", "data.max_documents", "run.eval_interval",
        "run.checkpoint_interval", "run.stop_at", "run.sample_tokens", "optim.weight_decay", "optim.grad_clip",
        "run.sample_temperature",
    ), 0),
}


# ------------------------------------------------------------------------------ field docs
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its trailing comment} for a dataclass defined with one field per line."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    docs: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.end_lineno - 1]
            hash_at = _comment_start(line)
            if hash_at is not None:
                docs[node.target.id] = line[hash_at + 1:].strip()
    return docs


def _comment_start(line: str) -> int | None:
    """Index of the '#' that starts a comment (not one inside a string literal)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return i
    return None


def option_table() -> list[tuple[str, str, str]]:
    """(dotted name, default, meaning) for every option, in section order, for ``--help``."""
    defaults = TrainConfig()
    rows = [("model.preset", defaults.model_preset,
             f"ModelArgs preset the model section starts from: {', '.join(MODEL_PRESETS)}")]
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(defaults, section), f.name)
            if dataclasses.is_dataclass(value):  # model.rope_scaling.*
                sub_docs = field_docs(type(value))
                for g in dataclasses.fields(value):
                    rows.append((f"{section}.{f.name}.{g.name}", _show(getattr(value, g.name)), sub_docs.get(g.name, "")))
                continue
            doc = docs.get(f.name, "")
            if section == "data" and f.name in ("policy", "val_policy"):
                doc += ": " + ", ".join(_policy_names())
            if section == "model" and f.name == "vocab_size":
                doc = "tokens; -1 = the tokenizer's vocabulary rounded up to a multiple of 64"
            rows.append((f"{section}.{f.name}", _show(value), doc))
    return rows


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "''"
    if value == "":
        return "''"
    return str(value)


def _policy_names() -> list[str]:
    from ..data import POLICIES

    return sorted(POLICIES)


# ------------------------------------------------------------------------------ building
def load_config(preset: str = "debug", files: list[str] | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- preset <- files <- overrides (``["--model.dim", "512", "--run.name=x"]``), validated."""
    if preset not in TRAIN_PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r}; choose from {', '.join(TRAIN_PRESETS)}")
    flat: dict[str, tuple[Any, str]] = {k: (v, f"preset {preset!r}") for k, v in TRAIN_PRESETS[preset].items()}
    for path in files or []:
        flat.update({k: (v, path) for k, v in _read_file(path).items()})
    flat.update({k: (v, "command line") for k, v in _parse_overrides(overrides or []).items()})
    return build_config(flat)


def build_config(flat: dict[str, tuple[Any, str]]) -> TrainConfig:
    """A validated config from {dotted name: (value, where it came from)}; string values (from
    the command line) are parsed by the field's type, file values are type-checked."""
    cfg = TrainConfig()
    names = _known_names()
    for key, (_, origin) in flat.items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(f"{origin}: unknown option {key!r}{hint}")
    model_values = {"vocab_size": -1}
    if "model.preset" in flat:
        value, origin = flat["model.preset"]
        if value not in MODEL_PRESETS:
            raise ConfigError(f"{origin}: model.preset {value!r} is not one of {', '.join(MODEL_PRESETS)}")
        cfg.model_preset = value
    rope: dict[str, Any] = {}
    for key, (value, origin) in flat.items():
        section, _, name = key.partition(".")
        if key == "model.preset":
            continue
        if section == "model":
            if name.startswith("rope_scaling."):
                sub = name.split(".", 1)[1]
                rope[sub] = coerce_field(RopeScaling, sub, value, key, origin)
            else:
                model_values[name] = coerce_field(ModelArgs, name, value, key, origin)
            continue
        obj = getattr(cfg, section)
        setattr(obj, name, coerce_field(type(obj), name, value, key, origin))
    values = dict(MODEL_PRESETS[cfg.model_preset])
    values.update(model_values)
    try:
        if rope:
            values["rope_scaling"] = RopeScaling(**rope)
        cfg.model = ModelArgs(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    cfg.validate()
    return cfg


def _known_names() -> list[str]:
    return [row[0] for row in option_table()]


def _read_file(path: str) -> dict[str, Any]:
    """A config file (.toml or .json) as {dotted name: value}: nested tables or dotted keys."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from None
    try:
        if path.endswith(".toml"):
            tree = tomllib.loads(raw.decode("utf-8"))
        elif path.endswith(".json"):
            tree = json.loads(raw)
        else:
            raise ConfigError(f"--config {path}: expected a .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--config {path}: expected a table/object at the top level")
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: dict) -> None:
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            # rope_scaling may be given whole, as a table
            if isinstance(v, dict):
                walk(key, v)
            else:
                flat[key] = v

    walk("", tree)
    return flat


def _parse_overrides(argv: list[str]) -> dict[str, str]:
    """``--a.b value`` and ``--a.b=value`` pairs; a bare ``--flag`` followed by another option
    (or nothing) means true."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"command line: expected --section.option VALUE, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not (argv[i + 1].startswith("--") and "." in argv[i + 1]):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        out[key] = value
        i += 1
    return out


def coerce_field(cls: type, name: str, value: Any, key: str, origin: str) -> Any:
    """``value`` converted to the type of ``cls.name``; strings are parsed, other values checked.
    A ``ConfigError`` says ``"<origin>: <key> must be ..."``."""
    hints = typing.get_type_hints(cls)
    kind = hints[name]
    optional = type(None) in typing.get_args(kind)
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    where = f"{origin}: {key}"
    if isinstance(value, str) and optional and value.lower() in ("none", "null"):
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} cannot be null")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            return [part for part in (p.strip() for p in value.split(",")) if part]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where} must be a list of strings (or a comma-separated string), got {value!r}")
    raise ConfigError(f"{where}: cannot set a field of type {kind}")


# ------------------------------------------------------------------------------ validation
def _validate(cfg: TrainConfig) -> None:
    def bad(key: str, message: str) -> ConfigError:
        return ConfigError(f"{key}: {message}")

    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise bad(key, f"{value!r} is not one of {', '.join(choices)}")
    policies = _policy_names()
    for name in ("policy", "val_policy"):
        value = getattr(cfg.data, name)
        if value not in policies:
            raise bad(f"data.{name}", f"{value!r} is not one of {', '.join(policies)}")
    if cfg.data.val_policy.startswith("naive-"):
        raise bad("data.val_policy", "a naive policy takes its length from the data, so validation would not be comparable")
    for key, low in _LOWER_BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < low:
            raise bad(key, f"must be >= {low}, got {value}")
    if not cfg.optim.lr > 0:
        raise bad("optim.lr", f"must be > 0, got {cfg.optim.lr}")
    for key, value in (("optim.beta1", cfg.optim.beta1), ("optim.beta2", cfg.optim.beta2)):
        if not 0 <= value < 1:
            raise bad(key, f"must be in [0, 1), got {value}")
    if not cfg.optim.eps > 0:
        raise bad("optim.eps", f"must be > 0, got {cfg.optim.eps}")
    if not 0 <= cfg.schedule.min_lr_ratio <= 1:
        raise bad("schedule.min_lr_ratio", f"must be in [0, 1], got {cfg.schedule.min_lr_ratio}")
    if cfg.schedule.warmup_steps < -1:
        raise bad("schedule.warmup_steps", f"must be >= 0 (or -1 = 5% of the steps), got {cfg.schedule.warmup_steps}")
    if cfg.schedule.warmup_steps > cfg.schedule.steps:
        raise bad("schedule.warmup_steps", f"{cfg.schedule.warmup_steps} exceeds schedule.steps={cfg.schedule.steps}")
    if cfg.run.stop_at > cfg.schedule.steps:
        raise bad("run.stop_at", f"{cfg.run.stop_at} exceeds schedule.steps={cfg.schedule.steps}")
    if not cfg.parallel.timeout_s > 0:
        raise bad("parallel.timeout_s", f"must be > 0, got {cfg.parallel.timeout_s}")
    if not cfg.run.name or os.sep in cfg.run.name or cfg.run.name in (".", ".."):
        raise bad("run.name", f"must be a plain directory name, got {cfg.run.name!r}")
    from .. import ops
    from ..attention import attention_backends

    if cfg.model.attn_backend not in attention_backends():
        raise bad("model.attn_backend", f"{cfg.model.attn_backend!r} is not one of {', '.join(attention_backends())}")
    for name, op_names in ops.IMPL_FIELDS.items():
        value = getattr(cfg.model, name)
        for op in op_names:
            if value != "auto" and value not in ops.registered(op):
                raise bad(f"model.{name}", f"{value!r} is not one of {', '.join(['auto'] + ops.registered(op))}")
    max_len = cfg.data.max_len or cfg.model.max_seq_len
    if max_len > cfg.model.max_seq_len:
        raise bad("data.max_len", f"{max_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.data.policy == "informed" and cfg.data.tolerance < 1:
        raise bad("data.tolerance", "policy 'informed' needs a tolerance >= 1 (the shortest overflow worth keeping)")
    if cfg.data.policy != "informed" and cfg.data.tolerance:
        raise bad("data.tolerance", f"only the 'informed' policy takes a tolerance, not {cfg.data.policy!r}")
    if cfg.data.policy.startswith("naive-") and cfg.data.max_len:
        raise bad("data.max_len", f"policy {cfg.data.policy!r} takes its length from the shortest document; leave max_len 0")
    if cfg.data.val and not cfg.data.train:
        raise bad("data.val", "validation sources without training sources: set data.train too (empty = built-in data for both)")
    for flag, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if getattr(cfg.logging, flag) and not (flag == "wandb" and cfg.logging.wandb_mode == "disabled"):
            import importlib.util

            if importlib.util.find_spec(package) is None:
                raise bad(f"logging.{flag}", f"needs the {package} package: pip install {package}")
    if cfg.run.init_from and not os.path.isdir(cfg.run.init_from):
        raise bad("run.init_from", f"checkpoint directory not found: {cfg.run.init_from}")
    if cfg.model.vocab_size != -1 and cfg.model.vocab_size < 1:
        raise bad("model.vocab_size", f"must be >= 1 or -1 (from the tokenizer), got {cfg.model.vocab_size}")
