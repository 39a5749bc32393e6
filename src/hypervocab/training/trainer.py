"""The uptraining loop: LoRA on the frozen base, hyper-encoders trained fully, exact resume, one or many processes.

Determinism is what makes resume and multi-process runs checkable: which windows
a micro-batch reads depends only on (step, micro-batch, rank) through
:class:`~hypervocab.training.data.MixtureOrder`, the auxiliary loss samples its
entries from a generator seeded the same way, and a checkpoint holds every
piece of state (weights, optimiser, scheduler, RNGs, step).

On a GPU the step never waits for the host: micro-batches are made ahead in loader processes
(:mod:`hypervocab.training.batches`) and copied from pinned memory, the losses are scored a chunk at
a time (:mod:`hypervocab.loss`), the compute runs in bfloat16 while the trainable weights and their
optimiser state stay float32, and the logged numbers are read back only every ``log_every`` steps.  Processes average
their gradients with one all-reduce per step (gloo on CPU, NCCL on GPUs), or shard the model with
FSDP2 and reduce-scatter them, so
N processes with accumulation A compute what one process computes with N x A.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..loading import resolve_device, training_dtype
from .batches import BatchMaker, eval_batches, micro_batches
from .config import TrainConfig
from .objective import NextHyperHead, Objective, ReconstructionHead

__all__ = ["train", "compile_blocks", "ReconstructionHead", "NextHyperHead", "RunResult"]

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


class RunResult(dict):
    """What :func:`train` returns: ``output_dir``, ``steps``, ``final_loss``, ``eval_loss``."""


# ---------------------------------------------------------------------------------------------- set-up


def _dist() -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun / accelerate launch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _dtype(name: str) -> torch.dtype:
    """The dtype of the frozen base weights and of the compute (:func:`~hypervocab.loading.training_dtype`)."""
    return training_dtype(name, resolve_device(None))[0]


def _available_memory() -> int:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _check_memory(config: TrainConfig, V: int, D: int, n_params: int) -> None:
    """Refuse settings whose scoring alone cannot fit, before any work (what to lower is in the message)."""
    from ..loss import _CHUNK_CELLS

    C = config.hyper.max_codebook_size
    item = 2 if _dtype(config.dtype) != torch.float32 else 4
    B, T = config.batch_size, config.window
    # a chunk of float32 logits (at least one position of every row), the teacher's, the gradient's copy in
    # the compute dtype and a spare; the hypertoken tables [B, C, D] and their gradients; the hidden states
    cells = min(B * T * (V + C), max(B * (V + C), _CHUNK_CELLS["other" if torch.cuda.is_available() else "cpu"]))
    scoring = cells * 4 * 4
    tables = 2 * B * C * D * 4 * 3
    need = scoring + tables + B * T * D * 4 * 4 + n_params * item * 2
    have = _available_memory()
    if need > have:
        raise ConfigError(
            f"batch_size={config.batch_size}, window={config.window} and max_codebook_size={C} need about "
            f"{need / 2**30:.1f} GiB (logits over V + C = {V + C} ids, scored a chunk of positions at a time, "
            f"hypertoken tables [B, C, D]) but only {have / 2**30:.1f} GiB is available: lower batch_size (and "
            f"raise grad_accum), window or max_codebook_size")


def _build_model(config: TrainConfig, rank: int) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from ..model import HyperModel
    from ..tokenizer import HyperTokenizer, load_tokenizer

    tok = load_tokenizer(config.base_model)
    base = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=_dtype(config.dtype))
    _check_memory(config, len(tok), base.get_input_embeddings().weight.shape[1],
                  sum(p.numel() for p in base.parameters()))
    hyper = replace(config.hyper, base_model_name_or_path=config.base_model)
    model = HyperModel.from_base(base, tok, hyper)
    if config.lora is not None:
        from peft import LoraConfig

        lc = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                        target_modules=config.lora.target_modules, task_type="CAUSAL_LM")
        try:
            model.add_lora(lc)
        except ValueError as e:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(f"lora.target_modules={config.lora.target_modules!r} does not fit this model ({e}); "
                              f"its linear layers are named: {', '.join(linear)}") from None
    for p in model.parameters():  # the frozen base may be bfloat16; what is trained, and AdamW's state, is float32
        if p.requires_grad:
            p.data = p.data.float()
    if config.compile:
        compile_blocks(base)
    return model, HyperTokenizer(tok, model.config)


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` each decoder block of ``model`` in place; returns how many.

    Only the blocks: the hypertoken tables, the codec's bookkeeping and the chunked scoring stay eager,
    and the window length may change from batch to batch (dynamic shapes).
    """
    # transformers names the blocks a model must not be split inside: its decoder layers
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    found = [m for m in model.modules() if type(m).__name__ in blocks]
    # every block shares its class's forward, and dynamo guards on each block's own constants (its layer index):
    # one compiled entry per block, more than dynamo's default of 8, past which the rest would run uncompiled
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * len(found))
    for module in found:
        module.compile(dynamic=True)
    return len(found)


def _schedule(config: TrainConfig, start: int = 0):
    """The learning-rate factor of each step: warmup, then cosine over the whole run's ``max_steps``; a run
    continued from ``init_from`` at step ``start`` warms up again over ``rewarm_steps`` (fresh AdamW state)."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        span = max(1, config.max_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        out = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if start and start <= step < start + config.rewarm_steps:
            out *= (step - start + 1) / (config.rewarm_steps + 1)
        return out

    return factor


def init_facts(init_from: str) -> tuple[Path, dict[str, Any]]:
    """The folder ``init_from`` names (``"default"``: the shipped model) and its ``training_facts.json``."""
    from ..pretrained import shipped_dir

    folder = Path(shipped_dir()) if init_from == "default" else Path(init_from)
    facts_path = folder / "training_facts.json"
    if not facts_path.is_file():
        raise ConfigError(f"init_from={init_from!r}: {str(facts_path)!r} does not exist; give a trained hypervocab "
                          "model folder with its training_facts.json (as recipes/smollm2-135m/ship.py writes it), "
                          "or 'default'")
    facts = json.loads(facts_path.read_text())
    if not isinstance(facts.get("steps"), int) or facts["steps"] < 0:
        raise ConfigError(f"init_from={init_from!r}: training_facts.json must give the steps trained as an int, "
                          f"got {facts.get('steps')!r}")
    return folder, facts


def _load_init(config: TrainConfig, model: Any, folder: Path) -> None:
    """Copy the hyper-encoders and LoRA weights of the trained model in ``folder`` into ``model``."""
    from safetensors.torch import load_file

    from ..config import CONFIG_NAME
    from ..model import WEIGHTS_NAME

    saved = json.loads((folder / CONFIG_NAME).read_text())
    for key in ("max_codebook_size", "max_subtokens", "encoder", "encoder_layers", "tie_encoders", "position_mode"):
        mine = getattr(model.config, key)
        if key in saved and saved[key] != mine:
            raise ConfigError(f"init_from={config.init_from!r} was trained with hyper.{key}={saved[key]!r}, but "
                              f"this run has hyper.{key}={mine!r}: set them equal")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    for name in ("input_encoder", "output_encoder"):
        if name == "output_encoder" and model.config.tie_encoders:
            continue
        part = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        try:
            getattr(model, name).load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"init_from={config.init_from!r}: its {name} does not fit this run's: {e}") from None
    adapter = folder / "adapter_model.safetensors"
    if config.lora is None or not adapter.is_file():
        if (config.lora is None) != (not adapter.is_file()):
            raise ConfigError(f"init_from={config.init_from!r} {'has' if adapter.is_file() else 'has no'} a LoRA "
                              f"adapter but this run's lora is {config.lora!r}")
        return
    ac = json.loads((folder / "adapter_config.json").read_text())
    for key, mine in (("r", config.lora.r), ("lora_alpha", config.lora.alpha)):
        if ac.get(key) != mine:
            name = "lora.alpha" if key == "lora_alpha" else "lora.r"
            raise ConfigError(f"init_from={config.init_from!r} was trained with {name}={ac.get(key)!r}, but this run "
                              f"has {name}={mine!r}: set them equal")
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model.base, load_file(str(adapter)))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ConfigError(f"init_from={config.init_from!r}: its adapter has weights this run's LoRA lacks "
                          f"(lora.target_modules differ?), e.g. {unexpected[0]}")


# ---------------------------------------------------------------------------------------------- checkpoints


def _checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(output_dir: Path, step: int, objective: Objective, opt: Any, sched: Any, *,
                     sharded: bool, rank: int, keep: int = 2) -> None:
    """Write ``checkpoints/step-N`` atomically (rank 0 writes; under FSDP every process gathers first)."""
    model, aux = objective.model, objective.aux
    if sharded:
        weights, optimizer = _full_trainable_state(objective, opt)
    if rank != 0:
        return
    root = output_dir / CHECKPOINTS
    tmp = root / f".tmp-step-{step:07d}"
    final = root / f"step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state: dict[str, Any] = {"scheduler": sched.state_dict(),
                             "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                     "torch": torch.get_rng_state()}}
    if sharded:
        model.save_pretrained(tmp / "model", state_dict=_unprefixed(weights, "model."))
        state.update(sharded=weights, optimizer=optimizer)
    else:
        model.save_pretrained(tmp / "model")
        state.update(aux=aux.state_dict(), optimizer=opt.state_dict())
    torch.save(state, tmp / "training_state.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")  # written last: marks the folder complete
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # atomic: a killed run leaves either the old checkpoints or the new one
    for old in _checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, objective: Objective, opt: Any, sched: Any, *, sharded: bool) -> int:
    """Restore everything :func:`_save_checkpoint` wrote; every process reads the files itself."""
    from safetensors.torch import load_file

    from ..model import WEIGHTS_NAME

    model, aux = objective.model, objective.aux
    state = torch.load(path / "training_state.pt", weights_only=False)
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        whole = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(objective, state["sharded"], options=whole)
        set_optimizer_state_dict(objective, opt, state["optimizer"], options=whole)
    else:
        tensors = load_file(str(path / "model" / WEIGHTS_NAME))
        for name in ("input_encoder", "output_encoder"):
            part = _unprefixed(tensors, name + ".")
            if part:
                getattr(model, name).load_state_dict(part)
        adapter = path / "model" / "adapter_model.safetensors"
        if adapter.is_file():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model.base, load_file(str(adapter)))
        aux.load_state_dict(state["aux"])
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return int(json.loads((path / "state.json").read_text())["step"])


def _shard(objective: Objective) -> None:
    """FSDP2: every decoder layer is its own unit, the rest of the objective the root unit."""
    from torch.distributed.fsdp import fully_shard

    # transformers names the blocks a model must not be split inside: its decoder layers
    blocks = {name for m in objective.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    for module in list(objective.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(objective)


def _full_trainable_state(objective: Objective, opt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable weights and the optimiser state of a sharded objective, whole, on rank 0's CPU.

    A collective: every process calls it.  Frozen base weights are left out, so this stays small
    however large the base model is.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return (get_model_state_dict(objective, options=whole),
            get_optimizer_state_dict(objective, opt, options=whole))


def _unprefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class _Run:
    """What the loop works with, as :func:`_set_up` made it; ``step`` counts the optimiser steps done."""

    config: TrainConfig
    rank: int
    world: int
    device: torch.device
    out_dir: Path
    show: bool
    started: float  # when train() started, for max_minutes
    model: Any
    htok: Any
    objective: Objective
    opt: Any
    sched: Any
    scaler: Any
    trainable: list[torch.Tensor]
    sharded: bool
    eval_set: Any
    maker: BatchMaker
    pin: bool
    batches: Iterator[Any]
    step: int
    tokens_seen: int = 0  # base tokens read by steps 1 .. step, counted along the data order

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS

    def evaluate(self, step: int) -> float | None:
        return _log_eval(self.objective, self.config, self.eval_set, self.maker, step, self.metrics_path, self.rank,
                         self.pin)

    def save(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()
        _save_checkpoint(self.out_dir, self.step, self.objective, self.opt, self.sched, sharded=self.sharded,
                         rank=self.rank)


class _Throughput:
    """Base tokens per second over the steps since the last logged one."""

    def __init__(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, base_tokens: int) -> None:
        self.tokens += base_tokens

    def rate(self) -> float:
        """The rate until now, and a new window from now."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0
        return rate


def train(config: TrainConfig, *, progress: bool | None = None) -> RunResult:
    """Uptrain ``config.base_model`` into a hypervocab model saved in ``config.output_dir``.

    Everything is checked before any compute: the config itself (all problems together), then the
    model's LoRA targets and the memory the settings need, then the data.  Resumes from the newest
    checkpoint in ``output_dir`` when ``config.resume``.  With ``max_minutes`` the loop stops after
    that much time (the model is evaluated and saved as at the end).
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    run = _set_up(config, progress)
    bar = None
    if run.show:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=run.step, desc="training", unit="step", dynamic_ncols=True)
    last = None
    deadline = None if config.max_minutes is None else run.started + 60 * config.max_minutes
    throughput = _Throughput()
    while run.step < config.max_steps:
        totals, base_tokens, codes, grad_norm, lrs = _step(run)
        run.step += 1
        run.tokens_seen += base_tokens
        throughput.add(base_tokens)
        out_of_time = _out_of_time(run, deadline)
        finishing = run.step == config.max_steps or out_of_time
        if bar is not None:
            bar.update(1)
        if run.step % config.log_every == 0 or finishing:
            last = _log_step(run, totals, grad_norm, lrs, base_tokens, codes, throughput)
            if bar is not None:
                bar.set_postfix(loss=f"{last['lm_loss']:.3f}", tok_s=f"{last['base_tokens_per_s']:.0f}",
                                codes_tok=f"{last['codes_per_token']:.2f}")
        if out_of_time:
            break
        if config.eval_every and run.step % config.eval_every == 0 and run.step < config.max_steps:
            run.evaluate(run.step)
        if config.save_every and run.step % config.save_every == 0 and run.step < config.max_steps:
            run.save()
    if bar is not None:
        bar.close()
    return _finish(run, last)


def _set_up(config: TrainConfig, progress: bool | None) -> _Run:
    """Model, data, objective, optimiser and loader, in the order that makes every process (and a resumed
    run) start from the same seeds; then the newest checkpoint when ``config.resume``."""
    from .data import MixtureOrder, base_tokens_read

    started = time.perf_counter()
    init = init_facts(config.init_from) if config.init_from is not None else None  # before any compute
    if init is not None and init[1]["steps"] >= config.max_steps:
        raise ConfigError(f"init_from={config.init_from!r} has trained {init[1]['steps']} steps already, max_steps "
                          f"is {config.max_steps}: give the whole run's max_steps")
    rank, world = _dist()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out_dir = Path(config.output_dir)
    show = (sys.stderr.isatty() if progress is None else progress) and rank == 0
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model, htok = _build_model(config, rank)
    model.to(device)
    if rank == 0:
        dtype, why = training_dtype(config.dtype, resolve_device(None))
        print(f"hypervocab train: computing in {str(dtype).replace('torch.', '')} ({why})", file=sys.stderr,
              flush=True)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save(out_dir / "train_config.json")
    train_set, eval_set = _windows(config, htok, model, out_dir, rank=rank, world=world, show=show)
    order = MixtureOrder(train_set, [d.weight for d in config.data], config.seed)
    torch.manual_seed(config.seed)  # the aux heads start the same in every process
    dtype = _dtype(config.dtype)
    objective = Objective(model, config, None if dtype == torch.float32 else dtype).to(device)
    aux = objective.aux
    sharded = world > 1 and config.distributed == "fsdp"
    if sharded:
        _shard(objective)  # before the optimiser: FSDP replaces the parameters with their shards
    init_step = 0
    done = _checkpoints(out_dir) if config.resume else []
    if init is not None:
        folder, facts = init
        init_step = facts["steps"]
        if not done:
            _load_init(config, model, folder)
            if rank == 0:
                print(f"hypervocab train: starting from {folder} at step {init_step} (about "
                      f"{facts.get('base_tokens_seen', '?')} base tokens seen); AdamW starts afresh, the learning "
                      f"rate warms up again over {config.rewarm_steps} steps", file=sys.stderr, flush=True)
    opt, trainable = _optimiser(config, model, aux, device, sharded=sharded)
    schedule = _schedule(config, init_step)
    if init_step and not done:  # the schedule goes on at the step the weights stopped at
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule, last_epoch=init_step - 1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    step = init_step if not done else 0
    if done:
        step = _load_checkpoint(done[-1], objective, opt, sched, sharded=sharded)
    if rank == 0:
        _truncate_metrics(out_dir / METRICS, step)
    objective.train()
    hyper = model.config
    maker = BatchMaker(model.codec, position_mode=hyper.position_mode, exact=hyper.codebook_mask == "exact",
                       score_next_id=hyper.score_next_id,
                       recon_entries=config.recon_entries if config.recon_weight else 0,
                       recon_negatives=config.recon_negatives,
                       teacher=config.distill_weight > 0 or config.phrase_weight > 0,
                       distill_fraction=config.distill_fraction)
    pin = device.type == "cuda"
    batches = iter(micro_batches(train_set, order, maker, batch_size=config.batch_size, grad_accum=config.grad_accum,
                                 world=world, rank=rank, seed=config.seed, start_step=step,
                                 max_steps=config.max_steps, workers=config.loader_workers, pin=pin))
    per_step = config.batch_size * config.grad_accum * world
    seen = base_tokens_read(train_set, order, draws_per_step=per_step, steps=step)
    return _Run(config, rank, world, device, out_dir, show, started, model, htok, objective, opt, sched, scaler,
                trainable, sharded, eval_set, maker, pin, batches, step, int(seen[-1]) if step else 0)


def _windows(config: TrainConfig, htok: Any, model: Any, out_dir: Path, *, rank: int, world: int,
             show: bool) -> tuple[Any, Any]:
    """The train and eval windows; rank 0 builds the cache, the other processes then read it."""
    from .data import build_windows

    cache = Path(config.cache_dir) if config.cache_dir else out_dir / "data"
    if rank == 0:
        train_set, eval_set = build_windows(config.data, htok.tokenizer, model.codec, window=config.window,
                                            eval_fraction=config.eval_fraction, seed=config.seed, cache_dir=cache,
                                            num_workers=config.num_workers, progress=show)
    if world > 1:
        torch.distributed.barrier()  # rank 0 built the cache; the others read it
        if rank:
            train_set, eval_set = build_windows(config.data, htok.tokenizer, model.codec, window=config.window,
                                                eval_fraction=config.eval_fraction, seed=config.seed,
                                                cache_dir=cache, num_workers=1, progress=False)
    if len(train_set) == 0:
        raise ConfigError("the data gave no training windows (every document went to the eval split?): "
                          "lower eval_fraction or add data")
    return train_set, eval_set


def _optimiser(config: TrainConfig, model: Any, aux: nn.Module, device: torch.device, *,
               sharded: bool) -> tuple[torch.optim.AdamW, list[torch.Tensor]]:
    """AdamW over the hyper-encoders and aux heads (``encoder_lr``) and the LoRA weights (``lr``); and those weights."""
    encoder_params = [p for n, p in model.named_parameters() if p.requires_grad and "_encoder." in n]
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad and "_encoder." not in n]
    groups = [{"params": encoder_params + list(aux.parameters()), "lr": config.encoder_lr}]
    if lora_params:
        groups.append({"params": lora_params, "lr": config.lr})
    # fused: one kernel for every parameter on a GPU; no other optimiser state than the plain AdamW one
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay,
                            **({"fused": True} if device.type == "cuda" and not sharded else {}))
    return opt, [p for g in groups for p in g["params"]]


def _step(run: _Run) -> tuple[dict[str, torch.Tensor], int, int, torch.Tensor, list[float]]:
    """One optimiser step over ``grad_accum`` micro-batches (of every process).

    Returns the summed loss terms (tensors on the device: nothing is read back inside a step), the base
    tokens and codes read, the gradient norm before clipping, and the learning rates the step used.
    """
    config, opt, scaler = run.config, run.opt, run.scaler
    totals: dict[str, torch.Tensor] = {}
    base_tokens = codes = 0
    for _ in range(config.grad_accum):
        batch = next(run.batches).to(run.device)
        loss, terms = run.objective(batch)
        loss = loss / config.grad_accum
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in terms.items():  # tensors on the device: nothing is read back inside a step
            totals[k] = totals[k] + v if k in totals else v
        base_tokens += batch.base_tokens
        codes += batch.codes
    if run.world > 1:
        totals, base_tokens, codes = _all_reduce(run, totals, base_tokens, codes)
    if scaler is not None:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm)
    lrs = [g["lr"] for g in opt.param_groups]
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    run.sched.step()
    opt.zero_grad(set_to_none=True)
    return totals, base_tokens, codes, grad_norm, lrs


def _all_reduce(run: _Run, totals: dict[str, torch.Tensor], base_tokens: int,
                codes: int) -> tuple[dict[str, torch.Tensor], int, int]:
    """Average the gradients over the processes, and sum what each one logs (one all-reduce for all of it)."""
    for p in ([] if run.sharded else run.trainable):  # FSDP has reduce-scattered its gradients already
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= run.world
    names = sorted(totals)
    packed = torch.stack([totals[k].double() for k in names]
                         + [torch.tensor(float(base_tokens), dtype=torch.float64, device=run.device),
                            torch.tensor(float(codes), dtype=torch.float64, device=run.device)])
    torch.distributed.all_reduce(packed)
    return dict(zip(names, packed[:-2])), int(packed[-2]), int(packed[-1])


def _out_of_time(run: _Run, deadline: float | None) -> bool:
    out_of_time = deadline is not None and time.perf_counter() >= deadline
    if run.world > 1 and deadline is not None:  # every process stops at the same step
        flag = torch.tensor([float(out_of_time)], device=run.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        out_of_time = bool(flag.item())
    return out_of_time


def _log_step(run: _Run, totals: dict[str, torch.Tensor], grad_norm: torch.Tensor, lrs: list[float],
              base_tokens: int, codes: int, throughput: _Throughput) -> dict[str, Any]:
    """The metrics record of the step just done, appended to ``metrics.jsonl`` (by rank 0) and returned."""
    # the one read-back of a logged step: every number of the step at once
    n = run.config.grad_accum * run.world
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    values = {k: float(v) for k, v in zip([*totals, "grad_norm"],
                                          torch.stack([v.double() for v in totals.values()]
                                                      + [grad_norm.double()]).tolist())}
    record = {"step": run.step, "lm_loss": values["lm_loss"] / n, "lr": lrs[-1], "encoder_lr": lrs[0],
              "grad_norm": values["grad_norm"], "codes_per_token": codes / max(base_tokens, 1),
              "hyper_target_share": values["hyper_targets"] / max(values["targets"], 1),
              "hyper_accuracy": values["hyper_correct"] / max(values["hyper_targets"], 1),
              "base_tokens_per_s": throughput.rate(),  # after the read-back: the step's work is done
              "base_tokens_seen": run.tokens_seen}
    for k in ("distill_loss", "phrase_loss", "recon_loss", "next_hyper_loss"):
        if k in values:
            record[k] = values[k] / n
    if run.rank == 0:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def _finish(run: _Run, last: dict[str, Any] | None) -> RunResult:
    """Evaluate and save the model where the loop stopped."""
    eval_loss = run.evaluate(run.step)
    weights = _full_trainable_state(run.objective, run.opt)[0] if run.sharded else None
    if run.rank == 0:
        run.model.eval()
        run.model.save_pretrained(run.out_dir, state_dict=None if weights is None else _unprefixed(weights, "model."))
        run.htok.tokenizer.save_pretrained(str(run.out_dir))
    if run.world > 1:
        torch.distributed.barrier()
    return RunResult(output_dir=str(run.out_dir), steps=run.step,
                     final_loss=None if last is None else last["lm_loss"], eval_loss=eval_loss)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics a killed run logged after its last checkpoint (they are logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _log_eval(objective: Objective, config: TrainConfig, eval_set: Any, maker: BatchMaker, step: int, path: Path,
              rank: int, pin: bool) -> float | None:
    """The next-code loss on the first ``eval_batches`` batches of the eval split, logged and returned."""
    if len(eval_set) == 0:
        return None
    was = objective.training
    objective.eval()
    device = next(objective.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in eval_batches(eval_set, maker, batch_size=config.batch_size,
                                  n=config.eval_batches * config.batch_size, workers=config.loader_workers, pin=pin):
            loss, terms = objective(batch.to(device), train=False)
            loss_sum += loss.double() * terms["targets"]
            count += terms["targets"]
    objective.train(was)
    loss = float(loss_sum / count.clamp(min=1))
    if rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "eval_loss": loss}) + "\n")
    return loss
