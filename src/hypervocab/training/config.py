"""``TrainConfig``: everything an uptraining run needs, validated before any work starts.

A run is described by one YAML (or JSON) file; every field can also be given as a
command-line flag (``hypervocab train --config run.yaml --lr 1e-4``).  Every problem
found is reported at once, each with what to change.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import HyperConfig
from ..errors import ConfigError, int_problem
from ..loading import DTYPES

__all__ = ["DataSource", "LoraSettings", "TrainConfig", "SOURCE_KINDS"]

SOURCE_KINDS = ("auto", "text", "jsonl", "chat", "hf_dataset")


@dataclass
class DataSource:
    """One source of training text.

    path: a text file, a folder (files chosen by ``glob``), a ``.jsonl`` file, or a folder saved by
        ``datasets.Dataset.save_to_disk``.
    kind: ``"text"`` (each file is a document), ``"jsonl"`` (each line's ``text_field`` is a document),
        ``"chat"`` (each JSONL line's ``messages_field`` is a list of ``{"role", "content"}`` messages,
        rendered with the tokenizer's chat template; only assistant turns are in the loss),
        ``"hf_dataset"`` (rows of a saved dataset, ``text_field`` or ``messages_field``), or ``"auto"``
        (from the path: ``.jsonl`` -> jsonl, a folder with ``dataset_info.json`` -> hf_dataset, else text).
    glob: which files of a folder (``"**/*.py"``); several patterns allowed.  Patterns match at any depth,
        and hidden files and folders are skipped (the rule of :mod:`hypervocab.textfiles`).
    weight: share of training windows drawn from this source, relative to the others.
    """

    path: str
    kind: str = "auto"
    glob: list[str] = field(default_factory=lambda: ["**/*"])
    text_field: str = "text"
    messages_field: str = "messages"
    weight: float = 1.0

    def problems(self, where: str) -> list[str]:
        out = []
        if self.kind not in SOURCE_KINDS:
            out.append(f"{where}.kind must be one of {', '.join(map(repr, SOURCE_KINDS))}, got {self.kind!r}")
        if not Path(self.path).exists():
            out.append(f"{where}.path {self.path!r} does not exist: give an existing file or folder")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight > 0:
            out.append(f"{where}.weight must be a number > 0, got {self.weight!r}")
        if isinstance(self.glob, str):
            self.glob = [self.glob]
        if not isinstance(self.glob, list) or not all(isinstance(g, str) and g for g in self.glob):
            out.append(f"{where}.glob must be a list of patterns such as '**/*.py', got {self.glob!r}")
        return out

    def resolved_kind(self) -> str:
        if self.kind != "auto":
            return self.kind
        p = Path(self.path)
        if p.suffix == ".jsonl":
            return "jsonl"
        if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
            return "hf_dataset"  # a saved Dataset, or a saved DatasetDict
        return "text"


@dataclass
class LoraSettings:
    """LoRA on the frozen base model (PEFT).  ``target_modules=None`` finds them for common architectures."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def problems(self) -> list[str]:
        out = []
        for name in ("r", "alpha"):
            problem = int_problem(f"lora.{name}", getattr(self, name), minimum=1)
            if problem:
                out.append(problem)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            out.append(f"lora.dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and (not isinstance(self.target_modules, list) or not all(
                isinstance(t, str) and t for t in self.target_modules)):
            out.append(f"lora.target_modules must be a list of module names or None, got {self.target_modules!r}")
        return out


# (name, minimum, maximum or None, what it is) for the numeric fields of TrainConfig
_INTS = {"window": 2, "batch_size": 1, "grad_accum": 1, "max_steps": 1, "warmup_steps": 0, "save_every": 0,
         "log_every": 1, "eval_every": 0, "eval_batches": 1, "seed": 0, "num_workers": 1, "loader_workers": 0,
         "recon_entries": 1, "recon_negatives": 0, "distill_top_k": 0, "rewarm_steps": 0}
_FLOATS = {"lr": (0.0, False), "encoder_lr": (0.0, False), "weight_decay": (0.0, True), "min_lr_ratio": (0.0, True),
           "max_grad_norm": (0.0, False), "recon_weight": (0.0, True), "next_hyper_weight": (0.0, True),
           "distill_weight": (0.0, True), "phrase_weight": (0.0, True)}


@dataclass
class TrainConfig:
    """An uptraining run.

    Model: base_model (hub id or folder), hyper (:class:`~hypervocab.HyperConfig` settings), lora
    (:class:`LoraSettings`, or ``None`` to train the encoders only), dtype (``"auto"``: bfloat16 where the
    hardware has it, else float32).
    Data: data (a list of :class:`DataSource`), window (codes per training window), eval_fraction
    (documents held out, chosen by a hash of the seed and the document), cache_dir (tokenized and compressed
    windows, reused by later runs; default ``<output_dir>/data``), num_workers (tokenizing processes).
    Optimisation: AdamW with lr (LoRA) and encoder_lr (hyper-encoders and auxiliary heads), weight_decay,
    warmup_steps then cosine down to ``min_lr_ratio * lr``, max_grad_norm clipping, batch_size windows per
    micro-batch and process, grad_accum micro-batches per step, max_steps optimiser steps.
    Losses: next-code cross-entropy over ``V + C`` (EOS included), plus distill_weight times the first-token
    distillation from the frozen base model (its next-token distribution at the same text position, kept as
    its distill_top_k most likely tokens and one bucket for the rest, 0: the whole distribution; it costs one
    forward without gradients over the windows it reads, a distill_fraction of each micro-batch's),
    phrase_weight times the phrase ceiling (the teacher's probability of a table row's whole phrase, read
    along the text, bounds the model's probability of that row: :func:`hypervocab.loss.phrase_ceiling`),
    recon_weight times the reconstruction loss (on up to recon_entries distinct entries per micro-batch,
    scored against their own subtokens and recon_negatives ids drawn from the rest, a sampled softmax with its
    usual correction; 0: the whole vocabulary) and
    next_hyper_weight times the next-is-hypertoken loss.
    Speed: dtype is that of the frozen base weights and of the compute (trainable weights and optimiser
    state stay float32; ``"auto"``: bfloat16 on a GPU that has it and on a CPU with AMX or AVX512-BF16,
    float32 elsewhere, and the run says which and why), loader_workers processes make micro-batches ahead
    (0: in the training process), compile compiles each decoder block with ``torch.compile``, max_minutes
    stops the loop after that much wall time (then evaluates and saves as at the end).
    Processes (under ``torchrun`` / ``accelerate launch``): distributed ``"ddp"`` (every process holds
    the whole model; gradients averaged) or ``"fsdp"`` (FSDP2: each decoder layer and the rest of the
    model sharded across processes, for models that do not fit in one device).
    Output: output_dir (checkpoints every save_every steps, metrics.jsonl, the final model), log_every,
    eval_every (0: only at the end), eval_batches, resume (continue from the newest checkpoint).
    Continuing: init_from, a trained hypervocab model folder (``"default"``: the shipped one) with its
    ``training_facts.json``: when ``output_dir`` holds no checkpoint yet, the run starts from its weights at
    the step it stopped at, so the schedule (planned over the whole run's ``max_steps``) and the data order
    go on from there; its optimiser state was not kept, so AdamW starts afresh and the learning rate warms
    up again over rewarm_steps.
    """

    base_model: str
    data: list[DataSource]
    output_dir: str
    hyper: HyperConfig = field(default_factory=HyperConfig)
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    dtype: str = "auto"
    window: int = 512
    eval_fraction: float = 0.05
    cache_dir: str | None = None
    num_workers: int = 1
    lr: float = 2e-4
    encoder_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    recon_weight: float = 0.1
    recon_entries: int = 256
    recon_negatives: int = 4096
    next_hyper_weight: float = 0.0
    distill_weight: float = 1.0
    phrase_weight: float = 0.0
    distill_top_k: int = 64
    distill_fraction: float = 0.5
    loader_workers: int = 2
    compile: bool = False
    max_minutes: float | None = None
    seed: int = 0
    save_every: int = 200
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    resume: bool = True
    distributed: str = "ddp"
    init_from: str | None = None
    rewarm_steps: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.hyper, dict):
            try:
                self.hyper = HyperConfig(**self.hyper)
            except TypeError as e:
                raise ConfigError(f"hyper: {e}") from None
        if isinstance(self.lora, dict):
            try:
                self.lora = LoraSettings(**self.lora)
            except TypeError as e:
                raise ConfigError(f"lora: {e}") from None
        if isinstance(self.data, (str, dict)):
            self.data = [self.data]
        if isinstance(self.data, list):
            try:
                self.data = [DataSource(path=d) if isinstance(d, str) else DataSource(**d) if isinstance(d, dict)
                             else d for d in self.data]
            except TypeError as e:
                raise ConfigError(f"data: {e}") from None
        # NumPy integers become Python ints (the config is saved as JSON); problems() reports anything else
        ints: list[tuple[Any, str]] = [(self, name) for name in _INTS]
        if isinstance(self.lora, LoraSettings):
            ints += [(self.lora, "r"), (self.lora, "alpha")]
        for obj, name in ints:
            if int_problem(name, getattr(obj, name)) is None:
                setattr(obj, name, int(getattr(obj, name)))
        problems = self.problems()
        if problems:
            raise ConfigError("the training config has problems:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Everything wrong with this config that can be seen without loading anything."""
        out = []
        if not isinstance(self.base_model, str) or not self.base_model:
            out.append(f"base_model must name a model (a hub id or a folder), got {self.base_model!r}")
        elif (self.base_model.startswith((".", "/", "~")) or Path(self.base_model).exists()) and not (
                Path(self.base_model).expanduser() / "config.json").is_file():
            out.append(f"base_model {self.base_model!r} is not a model folder (no config.json there)")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            out.append(f"output_dir must be a folder path, got {self.output_dir!r}")
        if not isinstance(self.data, list) or not self.data:
            out.append("data must list at least one source (a path, or {path: ..., kind: ..., weight: ...})")
        else:
            for i, d in enumerate(self.data):
                if not isinstance(d, DataSource):
                    out.append(f"data[{i}] must be a path or a mapping, got {type(d).__name__}")
                else:
                    out += d.problems(f"data[{i}]")
        if not isinstance(self.hyper, HyperConfig):
            out.append(f"hyper must be a mapping of HyperConfig settings, got {type(self.hyper).__name__}")
        if self.lora is not None:
            out += self.lora.problems() if isinstance(self.lora, LoraSettings) else [
                f"lora must be a mapping of LoRA settings or null, got {type(self.lora).__name__}"]
        if self.dtype not in DTYPES:
            allowed = ", ".join(map(repr, DTYPES[:-1])) + f" or {DTYPES[-1]!r}"
            out.append(f"dtype must be {allowed}, got {self.dtype!r}")
        for name, lo in _INTS.items():
            problem = int_problem(name, getattr(self, name), minimum=lo)
            if problem:
                out.append(problem)
        for name, (lo, inclusive) in _FLOATS.items():
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v >= lo if inclusive else v > lo)
            if not ok or v != v or v in (float("inf"),):
                out.append(f"{name} must be a finite number {'>=' if inclusive else '>'} {lo}, got {v!r}")
        if not isinstance(self.eval_fraction, (int, float)) or not 0 <= self.eval_fraction < 1:
            out.append(f"eval_fraction must be a number in [0, 1), got {self.eval_fraction!r}")
        if self.distributed not in ("ddp", "fsdp"):
            out.append(f"distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")
        for name in ("resume", "compile"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        m = self.max_minutes
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < float("inf")):
            out.append(f"max_minutes must be a number of minutes > 0, or null for no limit, got {m!r}")
        f = self.distill_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            out.append(f"distill_fraction must be a number in (0, 1] (the share of windows the teacher reads), "
                       f"got {f!r}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            out.append(f"init_from must be a hypervocab model folder, 'default' or null, got {self.init_from!r}")
        if isinstance(self.min_lr_ratio, (int, float)) and self.min_lr_ratio > 1:
            out.append(f"min_lr_ratio must be at most 1, got {self.min_lr_ratio!r}")
        return out

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # only what a person sets: the tokenizer fills in the rest when the model is built
        d["hyper"] = {k: v for k, v in d["hyper"].items() if v is not None and k != "hypervocab_version"}
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a YAML or JSON file; ``overrides`` (flags) replace its fields (``hyper``/``lora`` merge)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise ImportError("YAML configs need PyYAML: pip install 'hypervocab[train]'") from None
            raw = yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise ConfigError(f"{str(path)!r} must hold a mapping of settings, got {type(raw).__name__}")
        return cls.from_dict(raw, **overrides)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **overrides: Any) -> TrainConfig:
        raw = dict(raw)
        for key in ("hyper", "lora"):
            if isinstance(overrides.get(key), dict) and isinstance(raw.get(key), dict):
                overrides[key] = {**raw[key], **overrides[key]}
        raw.update(overrides)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        missing = [name for name in ("base_model", "data", "output_dir") if name not in raw]
        if missing:
            raise ConfigError("the training config has problems:\n  - " + "\n  - ".join(
                f"{name} is required" for name in missing))
        return cls(**raw)
