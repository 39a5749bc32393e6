"""The uptraining loop: LoRA on the frozen base, hyper-encoders trained fully, exact resume, one or many processes.

Determinism is what makes resume and multi-process runs checkable: which windows
a micro-batch reads depends only on (step, micro-batch, rank) through
:class:`~hypervocab.training.data.MixtureOrder`, the auxiliary loss samples its
entries from a generator seeded the same way, and a checkpoint holds every
piece of state (weights, optimiser, scheduler, RNGs, step).  Processes average
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .config import TrainConfig

__all__ = ["train", "ReconstructionHead", "NextHyperHead", "RunResult"]

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
# entries per micro-batch scored by the reconstruction loss: each costs M x V logits, so a sample is enough
_RECON_ENTRIES = 32


class ReconstructionHead(nn.Module):
    """Recovers the ``M`` base tokens of an entry from its input embedding (the auxiliary loss).

    One query per slot maps the embedding to a vector scored against the base
    embedding matrix, so the head stays small however large ``V`` is.
    """

    def __init__(self, dim: int, max_subtokens: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or min(dim, 256)
        self.max_subtokens = max_subtokens
        self.slots = nn.Linear(dim, max_subtokens * hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def loss(self, embeddings: torch.Tensor, phrases: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``embeddings`` [N, D], ``phrases`` [N, M] (-1 padded), ``table`` [V, D] -> mean cross-entropy."""
        N, M = phrases.shape
        h = self.out(self.norm(self.slots(embeddings).view(N, self.max_subtokens, -1)[:, :M]))  # [N, M, D]
        logits = h @ table.t()  # [N, M, V]
        return F.cross_entropy(logits.reshape(N * M, -1).float(), phrases.reshape(-1), ignore_index=-1)


class NextHyperHead(nn.Module):
    """Predicts from the last hidden state whether the next code is a hypertoken (optional auxiliary loss)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1)


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
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def _available_memory() -> int:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _check_memory(config: TrainConfig, V: int, D: int, n_params: int) -> None:
    """Refuse settings whose logits alone cannot fit, before any work (what to lower is in the message)."""
    C = config.hyper.max_codebook_size
    item = 2 if _dtype(config.dtype) != torch.float32 else 4
    # the [B, T, V + C] logits, their gradient and a float32 chunk of the loss; the hypertoken tables
    logits = config.batch_size * config.window * (V + C) * (2 * item + 4)
    tables = 2 * config.batch_size * C * D * 4 * 3
    need = logits + tables + n_params * item * 2
    have = _available_memory()
    if need > have:
        raise ConfigError(
            f"batch_size={config.batch_size}, window={config.window} and max_codebook_size={C} need about "
            f"{need / 2**30:.1f} GiB (logits over V + C = {V + C} ids for every position, hypertoken tables "
            f"[B, C, D]) but only {have / 2**30:.1f} GiB is available: lower batch_size (and raise grad_accum), "
            f"window or max_codebook_size")


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
    return model, HyperTokenizer(tok, model.config)


def _schedule(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        span = max(1, config.max_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ---------------------------------------------------------------------------------------------- checkpoints


def _checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(output_dir: Path, step: int, objective: _Objective, opt: Any, sched: Any, *,
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


def _load_checkpoint(path: Path, objective: _Objective, opt: Any, sched: Any, *, sharded: bool) -> int:
    """Restore everything :func:`_save_checkpoint` wrote; every process reads the files itself."""
    from safetensors.torch import load_file

    from ..model import WEIGHTS_NAME

    model, aux = objective.model, objective.aux
    state = torch.load(path / "training_state.pt", weights_only=False)
    if sharded:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

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


# ---------------------------------------------------------------------------------------------- one micro-batch


def _micro_step(model: Any, aux: nn.ModuleDict, config: TrainConfig, batch: dict[str, torch.Tensor],
                generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    from ..codebook import CodebookBatch

    V = model.codec.base_vocab_size
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    cb = CodebookBatch.from_codes(model.codec, ids)
    captured: dict[str, torch.Tensor] = {}
    hook = None
    if config.next_hyper_weight > 0:
        hook = model.head.register_forward_pre_hook(lambda _m, args: captured.__setitem__("hidden", args[0]))
    try:
        out = model(ids, mask, labels=labels, codebooks=cb)
    finally:
        if hook is not None:
            hook.remove()
    loss = out.loss
    terms = {"lm_loss": float(out.loss.detach())}
    if config.recon_weight > 0 and len(cb.phrases):
        n = len(cb.phrases)
        pick = torch.randperm(n, generator=generator)[: min(n, _RECON_ENTRIES)].numpy()
        phrases = torch.as_tensor(cb.phrases[np.sort(pick)], device=device)
        emb = model.encode_inputs(phrases)
        recon = aux["recon"].loss(emb, phrases, model.embedding.base.weight)
        loss = loss + config.recon_weight * recon
        terms["recon_loss"] = float(recon.detach())
    if config.next_hyper_weight > 0:
        target = labels[:, 1:]
        valid = target != -100
        logit = aux["next_hyper"](captured["hidden"][:, :-1].float())
        nh = F.binary_cross_entropy_with_logits(logit[valid], (target[valid] >= V).float())
        loss = loss + config.next_hyper_weight * nh
        terms["next_hyper_loss"] = float(nh.detach())
    with torch.no_grad():
        target = labels[:, 1:]
        valid = target != -100
        hyper = valid & (target >= V)
        terms["hyper_targets"] = float(hyper.sum())
        terms["targets"] = float(valid.sum())
        if hyper.any():
            pred = out.logits[:, :-1][hyper].argmax(-1)
            terms["hyper_correct"] = float((pred == target[hyper]).sum())
        else:
            terms["hyper_correct"] = 0.0
    return loss, terms


class _Objective(nn.Module):
    """The model and the auxiliary heads as one module whose forward computes a micro-batch's losses.

    FSDP gathers a unit's weights only inside that unit's forward, and the losses read weights outside
    the decoder layers (the encoders, the embedding matrix, the aux heads): making the whole objective
    the root unit keeps every read inside one forward.
    """

    def __init__(self, model: Any, aux: nn.ModuleDict, config: TrainConfig, device: torch.device) -> None:
        super().__init__()
        self.model, self.aux, self.config, self.device = model, aux, config, device

    def forward(self, batch: dict[str, torch.Tensor],
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        if generator is None:  # evaluation: the next-code loss alone
            out = self.model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                             labels=batch["labels"].to(self.device))
            return out.loss, {}
        return _micro_step(self.model, self.aux, self.config, batch, generator, self.device)


def _shard(objective: _Objective) -> None:
    """FSDP2: every decoder layer is its own unit, the rest of the objective the root unit."""
    from torch.distributed.fsdp import fully_shard

    # transformers names the blocks a model must not be split inside: its decoder layers
    blocks = {name for m in objective.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    for module in list(objective.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(objective)


def _full_trainable_state(objective: _Objective, opt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable weights and the optimiser state of a sharded objective, whole, on rank 0's CPU.

    A collective: every process calls it.  Frozen base weights are left out, so this stays small
    however large the base model is.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return (get_model_state_dict(objective, options=whole),
            get_optimizer_state_dict(objective, opt, options=whole))


def _unprefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------- the loop


def train(config: TrainConfig, *, progress: bool | None = None) -> RunResult:
    """Uptrain ``config.base_model`` into a hypervocab model saved in ``config.output_dir``.

    Everything is checked before any compute: the config itself (all problems together), then the
    model's LoRA targets and the memory the settings need, then the data.  Resumes from the newest
    checkpoint in ``output_dir`` when ``config.resume``.
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    from .data import MixtureOrder, build_windows

    rank, world = _dist()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    out_dir = Path(config.output_dir)
    show = (sys.stderr.isatty() if progress is None else progress) and rank == 0
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model, htok = _build_model(config, rank)
    model.to(device)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save(out_dir / "train_config.json")
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
    order = MixtureOrder(train_set, [d.weight for d in config.data], config.seed)
    D = model.embedding.base.weight.shape[1]
    torch.manual_seed(config.seed)  # the aux heads start the same in every process
    aux = nn.ModuleDict({"recon": ReconstructionHead(D, model.codec.max_subtokens),
                         "next_hyper": NextHyperHead(model.head.base.weight.shape[1])}).to(device)
    objective = _Objective(model, aux, config, device)
    sharded = world > 1 and config.distributed == "fsdp"
    if sharded:
        _shard(objective)  # before the optimiser: FSDP replaces the parameters with their shards
    encoder_params = [p for n, p in model.named_parameters() if p.requires_grad and "_encoder." in n]
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad and "_encoder." not in n]
    groups = [{"params": encoder_params + list(aux.parameters()), "lr": config.encoder_lr}]
    if lora_params:
        groups.append({"params": lora_params, "lr": config.lr})
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(config))
    trainable = [p for g in groups for p in g["params"]]
    step = 0
    done = _checkpoints(out_dir) if config.resume else []
    if done:
        step = _load_checkpoint(done[-1], objective, opt, sched, sharded=sharded)
    metrics_path = out_dir / METRICS
    if rank == 0:
        _truncate_metrics(metrics_path, step)
    objective.train()
    per_step = config.batch_size * config.grad_accum * world
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
    last = None
    while step < config.max_steps:
        t0 = time.perf_counter()
        totals: dict[str, float] = {}
        base_tokens = codes = 0
        for micro in range(config.grad_accum):
            start = step * per_step + (micro * world + rank) * config.batch_size
            idx = order.indices(start, config.batch_size)
            # seeded by the global micro-batch index: N processes draw what one process with N x A draws
            gen = torch.Generator().manual_seed(hash((config.seed, step, micro * world + rank)) & 0x7FFFFFFF)
            loss, terms = objective(train_set.batch(idx), gen)
            (loss / config.grad_accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v
            base_tokens += int(train_set.base_tokens[idx].sum())
            codes += int(train_set.n_codes[idx].sum())
        if world > 1:
            for p in ([] if sharded else trainable):  # FSDP has reduce-scattered its gradients already
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
            packed = torch.tensor([totals.get(k, 0.0) for k in sorted(totals)] + [base_tokens, codes],
                                  dtype=torch.float64)
            torch.distributed.all_reduce(packed)
            values = packed.tolist()
            totals = dict(zip(sorted(totals), values[:-2]))
            base_tokens, codes = int(values[-2]), int(values[-1])
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lrs = [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        n = config.grad_accum * world
        record = {"step": step, "lm_loss": totals["lm_loss"] / n, "lr": lrs[-1], "encoder_lr": lrs[0],
                  "grad_norm": grad_norm, "codes_per_token": codes / max(base_tokens, 1),
                  "hyper_target_share": totals["hyper_targets"] / max(totals["targets"], 1),
                  "hyper_accuracy": totals["hyper_correct"] / max(totals["hyper_targets"], 1),
                  "base_tokens_per_s": base_tokens / dt}
        for k in ("recon_loss", "next_hyper_loss"):
            if k in totals:
                record[k] = totals[k] / n
        last = record
        if rank == 0 and (step % config.log_every == 0 or step == config.max_steps):
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if config.eval_every and step % config.eval_every == 0 and step < config.max_steps:
            _log_eval(objective, config, eval_set, step, metrics_path, rank)
        if config.save_every and step % config.save_every == 0 and step < config.max_steps:
            if world > 1:
                torch.distributed.barrier()
            _save_checkpoint(out_dir, step, objective, opt, sched, sharded=sharded, rank=rank)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['lm_loss']:.3f}", tok_s=f"{record['base_tokens_per_s']:.0f}",
                            codes_tok=f"{record['codes_per_token']:.2f}")
    if bar is not None:
        bar.close()
    eval_loss = _log_eval(objective, config, eval_set, step, metrics_path, rank)
    weights = _full_trainable_state(objective, opt)[0] if sharded else None
    if rank == 0:
        model.eval()
        model.save_pretrained(out_dir, state_dict=None if weights is None else _unprefixed(weights, "model."))
        htok.tokenizer.save_pretrained(str(out_dir))
    if world > 1:
        torch.distributed.barrier()
    return RunResult(output_dir=str(out_dir), steps=step, final_loss=None if last is None else last["lm_loss"],
                     eval_loss=eval_loss)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics a killed run logged after its last checkpoint (they are logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _log_eval(objective: _Objective, config: TrainConfig, eval_set: Any, step: int, path: Path,
              rank: int) -> float | None:
    if len(eval_set) == 0:
        return None
    was = objective.training
    objective.eval()
    losses, weights = [], []
    with torch.no_grad():
        n = min(len(eval_set), config.eval_batches * config.batch_size)
        for s in range(0, n, config.batch_size):
            batch = eval_set.batch(np.arange(s, min(n, s + config.batch_size)))
            loss, _ = objective(batch)
            w = float((batch["labels"][:, 1:] != -100).sum())
            losses.append(float(loss) * w)
            weights.append(w)
    objective.train(was)
    loss = sum(losses) / max(sum(weights), 1.0)
    if rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "eval_loss": loss}) + "\n")
    return loss
