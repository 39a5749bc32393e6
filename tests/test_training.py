"""Uptraining on a tiny random model: it learns to use hypertokens, resumes exactly, and runs in two processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hypervocab import HyperModel, HyperTokenizer
from hypervocab.errors import ConfigError
from hypervocab.training import TrainConfig, train

transformers = pytest.importorskip("transformers")

from .models import V  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LINES = ["def add(a, b):\n    return a + b\n\n", "for item in items:\n    print(item)\n\n",
         "if value is None:\n    value = default\n\n", "class Point:\n    x: float\n    y: float\n\n"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama over the real SmolLM2 tokenizer, saved as a model folder.

    Its weights start wide (std 0.5): with the usual 0.02 its frozen tied head gives every logit nearly the
    same value, and no LoRA can reach a low loss through the final norm.
    """
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        initializer_range=0.5)).save_pretrained(d)
    smollm2_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def repetitive_data(tmp_path_factory):
    """Highly repetitive real-looking code: each file repeats a few snippets many times."""
    d = tmp_path_factory.mktemp("data")
    for i in range(12):
        text = "".join(LINES[(i + k) % len(LINES)] for k in range(40))
        (d / f"snippets_{i:02d}.py").write_text(text)
    return d


def config(base_dir, data, out, **kw) -> TrainConfig:
    settings = dict(base_model=str(base_dir), data=[str(data)], output_dir=str(out), window=64, batch_size=4,
                    max_steps=12, warmup_steps=2, lr=1e-2, encoder_lr=1e-2, save_every=0, log_every=1,
                    eval_fraction=0.0, hyper={"max_codebook_size": 64, "max_subtokens": 4},
                    lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"]})
    settings.update(kw)
    return TrainConfig(**settings)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def greedy_hyper_share(model: HyperModel, htok: HyperTokenizer) -> float:
    enc = htok([LINES[0] * 3, LINES[1] * 3], return_tensors="pt", padding=True)
    out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=40, eos_token_id=[],
                         return_dict_in_generate=True)
    return sum(s.hypertokens for s in out.stats) / sum(s.codes for s in out.stats)


def test_training_makes_the_loss_fall_and_greedy_output_use_hypertokens(base_dir, repetitive_data, tmp_path):
    out = tmp_path / "run"
    result = train(config(base_dir, repetitive_data, out, max_steps=100, log_every=5), progress=False)
    rows = [r for r in metrics(out) if "lm_loss" in r]
    assert result["steps"] == 100 and rows[-1]["step"] == 100
    assert rows[-1]["lm_loss"] < 0.3 * rows[0]["lm_loss"]
    assert rows[-1]["hyper_accuracy"] > rows[0]["hyper_accuracy"]
    assert rows[-1]["recon_loss"] < 0.5 * rows[0]["recon_loss"]
    trained = HyperModel.from_pretrained(out).eval()
    htok = HyperTokenizer.from_pretrained(out)
    fresh = HyperModel.from_base(transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval(), htok.tokenizer,
                                 trained.config).eval()
    before, after = greedy_hyper_share(fresh, htok), greedy_hyper_share(trained, htok)
    assert after > 0.3 and after > before + 0.2, (before, after)
    from hypervocab.plots import plot_run

    png = plot_run(out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reconstruction_loss_falls_towards_zero(base_dir, repetitive_data, tmp_path):
    """The input encoder (no LoRA) learns to keep every subtoken of an entry recoverable."""
    out = tmp_path / "recon"
    train(config(base_dir, repetitive_data, out, max_steps=100, lora=None, recon_weight=1.0, encoder_lr=3e-2,
                 log_every=10), progress=False)
    rows = [r for r in metrics(out) if "recon_loss" in r]
    assert rows[-1]["recon_loss"] < 0.2 * rows[0]["recon_loss"], rows


def test_reconstruction_loss_alone_goes_to_near_zero(base_dir, smollm2_tokenizer):
    """Trained on its own, the reconstruction loss recovers every subtoken of real entries almost surely."""
    import numpy as np

    from hypervocab.codebook import CodebookBatch
    from hypervocab.training.trainer import ReconstructionHead

    torch.manual_seed(0)
    model = HyperModel.from_base(transformers.AutoModelForCausalLM.from_pretrained(base_dir), smollm2_tokenizer,
                                 config(base_dir, base_dir, base_dir).hyper)
    text = (Path(__file__).parent.parent / "src" / "hypervocab" / "codec.py").read_text()[:6000]
    ids = HyperTokenizer(smollm2_tokenizer, model.config)(text, return_tensors="pt")["input_ids"]
    phrases = torch.as_tensor(np.unique(CodebookBatch.from_codes(model.codec, ids).phrases, axis=0))[:64]
    assert len(phrases) == 64 and (phrases[:, 1] >= 0).all()
    head = ReconstructionHead(model.embedding.base.weight.shape[1], model.codec.max_subtokens)
    opt = torch.optim.Adam([*model.input_encoder.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(150):
        loss = head.loss(model.encode_inputs(phrases), phrases, model.embedding.base.weight.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[0] > 5 and losses[-1] < 0.05, losses[::10]


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "hypervocab.cli.main", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_a_run_killed_with_sigkill_resumes_to_the_same_loss_curve(base_dir, repetitive_data, tmp_path):
    cfg = config(base_dir, repetitive_data, tmp_path / "x", max_steps=24, save_every=4)
    path = tmp_path / "run.json"
    cfg.save(path)
    whole = tmp_path / "whole"
    p = run_cli(["--config", str(path), "--output-dir", str(whole)])
    assert p.wait(600) == 0, p.stderr.read().decode()
    killed = tmp_path / "killed"
    p = run_cli(["--config", str(path), "--output-dir", str(killed)])
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "step-0000012" / "state.json").is_file():
        assert p.poll() is None and time.time() < deadline, p.stderr.read().decode()
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    logged = [r["step"] for r in metrics(killed) if "lm_loss" in r]
    assert max(logged) < 24, "the run finished before it was killed"
    p = run_cli(["--config", str(path), "--output-dir", str(killed)])
    assert p.wait(600) == 0, p.stderr.read().decode()
    a = [(r["step"], r["lm_loss"], r.get("recon_loss")) for r in metrics(whole) if "lm_loss" in r]
    b = [(r["step"], r["lm_loss"], r.get("recon_loss")) for r in metrics(killed) if "lm_loss" in r]
    assert [s for s, _, _ in b] == list(range(1, 25))
    assert a == b


def two_processes(args: list[str], port: int, *, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Run ``hypervocab train`` in 2 CPU processes (gloo) under torchrun or ``accelerate launch``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    if launcher == "torchrun":
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    else:  # --multi_gpu is accelerate's name for "start N processes through torchrun's machinery", CPU or not
        cmd = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
               "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}"]
    return subprocess.run([sys.executable, *cmd, "-m", "hypervocab.cli.main", "train", *args],
                          env=env, capture_output=True, timeout=600)


def assert_same_curves(a_dir: Path, b_dir: Path, steps: int) -> None:
    a = [r for r in metrics(a_dir) if "lm_loss" in r]
    b = [r for r in metrics(b_dir) if "lm_loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        for k in ("lm_loss", "recon_loss", "grad_norm", "codes_per_token"):
            assert abs(x[k] - y[k]) <= 1e-4 * max(1.0, abs(x[k])), (k, x, y)


def test_two_processes_equal_one_process_with_twice_the_accumulation(base_dir, repetitive_data, tmp_path):
    """DDP and FSDP (gloo, 2 processes; torchrun or accelerate launch) compute what one process computes with
    twice the accumulation."""
    cfg = config(base_dir, repetitive_data, tmp_path / "x", max_steps=6, batch_size=2, save_every=3)
    path = tmp_path / "run.json"
    cfg.save(path)
    one = run_cli(["--config", str(path), "--output-dir", str(tmp_path / "one"), "--grad-accum", "2"])
    assert one.wait(600) == 0, one.stderr.read().decode()
    for i, (mode, launcher) in enumerate([("ddp", "torchrun"), ("fsdp", "torchrun"), ("ddp", "accelerate")]):
        out = tmp_path / (mode if launcher == "torchrun" else launcher)
        two = two_processes(["--config", str(path), "--output-dir", str(out), "--distributed", mode], 29517 + i,
                            launcher=launcher)
        assert two.returncode == 0, two.stderr.decode()[-3000:]
        assert_same_curves(tmp_path / "one", out, 6)

    # the sharded run saved whole weights: they load as an ordinary model and match the one-process run
    a, b = (HyperModel.from_pretrained(tmp_path / d) for d in ("one", "fsdp"))
    sa, sb = a.state_dict(), b.state_dict()
    trained = [k for k in sa if "_encoder." in k or "lora_" in k]
    assert trained and set(trained) <= set(sb)
    for k in trained:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-4, rtol=1e-3)

    # a sharded run resumes from its checkpoint to the same curve
    resumed = tmp_path / "fsdp-resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    os.replace(tmp_path / "fsdp" / "checkpoints" / "step-0000003", resumed / "checkpoints" / "step-0000003")
    (resumed / "metrics.jsonl").write_text((tmp_path / "fsdp" / "metrics.jsonl").read_text())
    again = two_processes(["--config", str(path), "--output-dir", str(resumed), "--distributed", "fsdp"], 29520)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    assert_same_curves(tmp_path / "one", resumed, 6)


def test_bad_configs_fail_before_any_compute(base_dir, repetitive_data, tmp_path):
    with pytest.raises(ConfigError) as e:
        TrainConfig(base_model=str(tmp_path / "nowhere"), data=[str(tmp_path / "missing"), {"path": str(
            repetitive_data), "weight": 0}], output_dir=str(tmp_path / "o"), lr=-1, window=1, distributed="zero3")
    message = str(e.value)
    for part in ["base_model", "data[0].path", "does not exist", "data[1].weight must be a number > 0, got 0",
                 "lr must be a finite number > 0.0, got -1", "window must be an int >= 2, got 1",
                 "distributed must be 'ddp' or 'fsdp', got 'zero3'"]:
        assert part in message
    with pytest.raises(ConfigError, match=re.escape("lora.target_modules=['attention_xyz'] does not fit this model")):
        train(config(base_dir, repetitive_data, tmp_path / "lora", lora={"target_modules": ["attention_xyz"]}))
    assert not (tmp_path / "lora" / "data").exists()  # nothing was tokenized
    with pytest.raises(ConfigError, match=r"max_codebook_size=50000000 need about .* GiB .* lower batch_size"):
        train(config(base_dir, repetitive_data, tmp_path / "big", hyper={"max_codebook_size": 50_000_000}))
    assert not (tmp_path / "big").exists()
    with pytest.raises(ConfigError, match="unknown training settings: learning_rate"):
        TrainConfig.from_dict({"base_model": str(base_dir), "data": [], "output_dir": "o", "learning_rate": 1})


def test_loader_workers_do_not_change_the_run(base_dir, repetitive_data, tmp_path):
    """Micro-batches made ahead in loader processes are exactly those made in the training process."""
    for workers in (0, 2):
        train(config(base_dir, repetitive_data, tmp_path / f"w{workers}", max_steps=4, loader_workers=workers),
              progress=False)
    a, b = ([(r["lm_loss"], r["distill_loss"], r["recon_loss"]) for r in metrics(tmp_path / d) if "lm_loss" in r]
            for d in ("w0", "w2"))
    assert len(a) == 4 and a == b


def test_distillation_keeps_the_model_near_its_base(base_dir, repetitive_data, tmp_path):
    """Same tokens, with and without the distillation: with it the first-token KL from the base model is lower.

    (A tiny random base model is a poor teacher and the repetitive data pulls hard, so the weight is high here.)
    """
    from hypervocab.evaluation.likelihood import first_token_divergence

    kl = {}
    for weight in (0.0, 3.0):
        out = tmp_path / f"d{weight}"
        train(config(base_dir, repetitive_data, out, max_steps=30, distill_weight=weight, lr=3e-3, encoder_lr=3e-3),
              progress=False)
        model = HyperModel.from_pretrained(out).eval()
        held_out = "".join(LINES[k % len(LINES)] for k in (1, 3, 0, 2, 1, 0))
        kl[weight] = first_token_divergence(model, HyperTokenizer.from_pretrained(out).tokenizer, [held_out])[
            "kl_per_code"]
    assert kl[3.0] < 0.85 * kl[0.0], kl
    logged = [r for r in metrics(tmp_path / "d3.0") if "lm_loss" in r]
    assert logged[-1]["distill_loss"] < 0.85 * logged[0]["distill_loss"]
    assert all("distill_loss" not in r for r in metrics(tmp_path / "d0.0"))


def test_bfloat16_compute_keeps_the_trained_weights_float32(base_dir, repetitive_data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    result = train(config(base_dir, repetitive_data, out, max_steps=3, dtype="bfloat16"), progress=False)
    assert result["steps"] == 3 and all(r["lm_loss"] == r["lm_loss"] for r in metrics(out) if "lm_loss" in r)
    for name in ("hypervocab_encoders.safetensors", "adapter_model.safetensors"):
        tensors = load_file(str(out / name))
        assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}, name


def test_max_minutes_stops_the_loop_and_still_saves(base_dir, repetitive_data, tmp_path):
    out = tmp_path / "timed"
    result = train(config(base_dir, repetitive_data, out, max_steps=1000, max_minutes=1e-4, log_every=100),
                   progress=False)
    assert result["steps"] == 1 and result["eval_loss"] is None
    assert [r["step"] for r in metrics(out) if "lm_loss" in r] == [1]  # the last step is logged
    assert (out / "hypervocab_encoders.safetensors").is_file()


def test_new_settings_are_checked_before_any_compute(base_dir, repetitive_data, tmp_path):
    with pytest.raises(ConfigError) as e:
        config(base_dir, repetitive_data, tmp_path / "o", distill_weight=-1, max_minutes=0, compile="yes",
               loader_workers=-1, recon_entries=0)
    for part in ["distill_weight must be a finite number >= 0.0, got -1",
                 "max_minutes must be a number of minutes > 0, or null for no limit, got 0",
                 "compile must be true or false, got 'yes'", "loader_workers must be an int >= 0, got -1",
                 "recon_entries must be an int >= 1, got 0"]:
        assert part in str(e.value)
