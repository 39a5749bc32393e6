#!/usr/bin/env python
"""The shipped model's GPU run in two device calls, sized for one issue's budget.

The budget: 15 minutes of device time in all (the machine's start included), at most 10 minutes per
command, at most 64 MiB carried per call with the repository, 8 files of at most 16 MB back, and the
machine's files under /root kept only while it is warm (30 s after a call).  The base model's GGUF file
alone is 98 MB, so the run takes two calls in a row:

``pack`` (CPU, here)
    Fills ``.carry/gpu1`` and ``.carry/gpu2`` (git-ignored): the GGUF file xz-compressed and split in two,
    the tokenizer with the model's config.json, the corpus pack of ``corpus.py pack`` (part 1 and part 2,
    with its held-out line hashes), the held-out evaluation files and the ``gguf`` wheel.  Checks that
    each call, repository included, stays under the limit.
``call1`` (device)
    Copies the repository and the carried files to ``WORK`` (``/root/hv``), builds the C extension,
    and starts, in its own process session so that it outlives the call, ``prepare 1``: the corpus from
    the image's package trees and part 1 (``corpus.py build --source image``) and its training windows.
    Meanwhile it times the trainer's own step on a random-init SmolLM2 (same speed as the real weights),
    eager and compiled, and writes the plan: compile or not, and the seconds a step takes.
``call2`` (device, within 30 s of call 1)
    Reassembles and converts the GGUF file while ``prepare 2`` adds part 2 to the corpus and its windows,
    trains (``hypervocab train``) for as many steps as fit before a deadline that leaves time to evaluate
    on the held-out files (bits per byte, first-token divergence, greedy samples), then puts the run (in
    float16) and every figure into ``$OUT``.
``rehearse`` (CPU)
    ``call1`` and ``call2`` here at toy scale with the same code (``--toy``), under ``.cache/rehearsal``.
``land`` (CPU)
    Unpacks what call 2 brought back into ``.cache/runs/smollm2-135m-gpu``; then ``ship.py --run`` and
    ``report.py`` as usual.

    python recipes/smollm2-135m/gpu_run.py pack
    # device: run("python3 recipes/smollm2-135m/gpu_run.py call1", carry=[".carry/gpu1"], timeout_s=300)
    # device: run("python3 recipes/smollm2-135m/gpu_run.py call2", carry=[".carry/gpu2"], timeout_s=600)
    python recipes/smollm2-135m/gpu_run.py land /path/to/returned/files
    python recipes/smollm2-135m/gpu_run.py rehearse          # the whole path at toy scale, about 10 minutes here
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CARRY = ROOT / ".carry"
LIMIT = 64 << 20  # bytes a call may carry, repository included
MARGIN = 1 << 20
WORK = Path("/root/hv")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOMAINS = ("python", "cpp", "code", "docs", "intl", "json", "yaml", "csv", "po", "chat")
ORIGINS = ("tree", "part-1", "part-2")  # the corpus's origins, in the order their windows are built
BASE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
              "config.json", "generation_config.json")
EVAL_BYTES = 40_000  # held-out bytes per domain, as report.py reads
# what the full-size run uses (--toy shrinks it)
FULL = {"batch": 32, "window": 1024, "bench_steps": 4, "eval_bytes": EVAL_BYTES, "budget": 575.0, "eval_seconds": 110.0,
        "corpus_mb": None, "device": "cuda", "new_tokens": 80, "max_steps": None}
TOY = {"batch": 2, "window": 64, "bench_steps": 1, "eval_bytes": 1500, "budget": 1500.0, "eval_seconds": 300.0,
       "corpus_mb": 0.3, "device": "cpu", "new_tokens": 12, "max_steps": 3}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, check: bool = True,
        logfile: Path | None = None) -> int:
    log("$ " + " ".join(str(c) for c in cmd))
    with open(logfile, "a") if logfile else open(os.devnull, "w") as sink:
        proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sink.write(line)
            if logfile is None or "it/s]" not in line:  # progress bars to the file only
                print(line, end="", flush=True)
        code = proc.wait()
    if check and code:
        raise SystemExit(f"failed ({code}): {' '.join(str(c) for c in cmd)}")
    return code


# ---------------------------------------------------------------------------------------------- pack (CPU)


def _repo_bytes() -> int:
    """What a call carries of the repository: tracked files and untracked files git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def _tar_xz(out: Path, files: dict[str, Path]) -> None:
    with tarfile.open(out, "w:xz", preset=9) as tar:
        for name, path in sorted(files.items()):
            info = tar.gettarinfo(str(path), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(path, "rb") as f:
                tar.addfile(info, f)


def _eval_files(heldout: Path, max_bytes: int) -> dict[str, Path]:
    """The held-out files ``evaluate_run.heldout_texts`` reads, by their path under ``heldout``."""
    sys.path.insert(0, str(HERE))
    from evaluate_run import DOMAINS as EVAL_DOMAINS

    out = {}
    for domain, pattern in EVAL_DOMAINS.items():
        used = 0
        for path in sorted((heldout / domain).rglob(pattern)):
            out[path.relative_to(heldout).as_posix()] = path
            used += path.stat().st_size
            if used >= max_bytes:
                break
    return out


def cmd_pack(args: argparse.Namespace) -> None:
    os.environ.setdefault("HYPERVOCAB_CACHE", str(ROOT / ".cache"))
    from hypervocab.pretrained import smollm2_base_dir, smollm2_gguf, smollm2_tokenizer_dir

    scratch = ROOT / ".cache" / "gpu-pack"
    scratch.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    xz = scratch / (GGUF_NAME + ".xz")
    if not xz.is_file() or xz.stat().st_mtime < gguf.stat().st_mtime:
        log(f"compressing {gguf.name} ({gguf.stat().st_size / 1e6:.1f} MB)")
        with open(xz.with_suffix(".tmp"), "wb") as f:
            subprocess.run(["xz", "-6", "-T0", "-c", str(gguf)], stdout=f, check=True)
        os.replace(xz.with_suffix(".tmp"), xz)
    pack = args.corpus_pack
    if not (pack / "part-1.tar.xz").is_file():
        run([sys.executable, HERE / "corpus.py", "pack", "--out", pack])
    data = ROOT / ".cache" / "smollm2-data"
    if not (data / "heldout").is_dir():
        run([sys.executable, HERE / "prepare_data.py", "--out", data])
    shutil.rmtree(CARRY, ignore_errors=True)
    one, two = CARRY / "gpu1", CARRY / "gpu2"
    one.mkdir(parents=True)
    two.mkdir(parents=True)
    base, tok = smollm2_base_dir(), smollm2_tokenizer_dir()
    files = {n: p for n in BASE_FILES for p in (tok / n, base / n) if p.is_file()}
    _tar_xz(one / "base.tar.xz", files)
    _tar_xz(one / "heldout.tar.xz", _eval_files(data / "heldout", EVAL_BYTES))
    for name in ("part-1.tar.xz", "heldout-lines.bin", "manifest.json"):
        shutil.copyfile(pack / name, one / name)
    shutil.copyfile(pack / "part-2.tar.xz", two / "part-2.tar.xz")
    from importlib.metadata import version

    import gguf as gguf_package

    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", one / "wheels",
         f"gguf=={version('gguf')}"])
    del gguf_package
    # the GGUF file's two halves even out the two calls
    repo = _repo_bytes()
    sizes = {d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) for d in (one, two)}
    total = xz.stat().st_size
    first = max(0, min(total, (total + sizes[two] - sizes[one]) // 2))
    with open(xz, "rb") as f:
        (one / "model.gguf.xz.1").write_bytes(f.read(first))
        (two / "model.gguf.xz.2").write_bytes(f.read())
    ok = True
    for d in (one, two):
        carried = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        fits = repo + carried + MARGIN <= LIMIT
        ok &= fits
        log(f"{d.relative_to(ROOT)}: {carried / 2**20:.1f} MiB + repository {repo / 2**20:.1f} MiB = "
            f"{(repo + carried) / 2**20:.1f} MiB of {LIMIT / 2**20:.0f} {'(fits)' if fits else '(TOO BIG)'}")
    if not ok:
        raise SystemExit("a call would carry more than the limit: shrink the corpus pack (corpus.py pack --max-mb)")


# ---------------------------------------------------------------------------------------------- on the device


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=f"{work / 'repo' / 'src'}:{work / 'site'}", HYPERVOCAB_CACHE=str(work / "cache"),
               TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    return env


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return TOY if args.toy else FULL


def _out() -> Path:
    out = Path(os.environ.get("OUT") or WORK / "out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_call1(args: argparse.Namespace) -> None:
    t0 = time.time()
    work, s = args.work, _settings(args)
    work.mkdir(parents=True, exist_ok=True)
    (work / "t0").write_text(str(t0))
    carry = work / "carry"
    carry.mkdir(exist_ok=True)
    for p in (args.carry or CARRY / "gpu1").iterdir():
        shutil.copyfile(p, carry / p.name) if p.is_file() else shutil.copytree(p, carry / p.name, dirs_exist_ok=True)
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".carry", ".cache", ".venv", "*.so", "build",
                                                              "__pycache__"))
    env = _env(work)
    run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=repo, env=env)
    wheels = sorted((carry / "wheels").glob("*.whl"))
    if wheels:
        run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
             work / "site", *wheels], env=env)
    for name, dest in (("base.tar.xz", work / "base"), ("heldout.tar.xz", work / "heldout")):
        with tarfile.open(carry / name) as tar:
            tar.extractall(dest, filter="data")
    # the corpus and its windows: in the background, in a session of their own, so they outlive this call
    prep = [sys.executable, repo / "recipes" / "smollm2-135m" / "gpu_run.py", "prepare", "1", "--work", work]
    if args.toy:
        prep.append("--toy")
    with open(work / "prepare-1.log", "w") as f:
        subprocess.Popen([str(c) for c in prep], env=env, stdout=f, stderr=subprocess.STDOUT,
                         start_new_session=True)
    log("prepare 1 started in the background")
    # the plan: the trainer's step, eager and compiled, on the architecture with random weights
    bench = [sys.executable, repo / "benchmarks" / "training_speed.py", "--device", s["device"], "--random-init",
             "--model", work / "base", "--batch", str(s["batch"]), "--window", str(s["window"]),
             "--steps", str(s["bench_steps"]), "--blocks", "1", "--loader-workers", "4"]
    out = _out()
    figures = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "--runs", "hyper"])):
        if name == "compiled" and args.no_compile:
            continue
        path = work / f"bench-{name}.json"
        code = run([*bench, *extra, "--json", path], env=env, check=False, logfile=work / "bench.log")
        if code == 0:
            figures[name] = json.loads(path.read_text())
    if "eager" not in figures:
        raise SystemExit("the step could not be timed: see bench.log")
    step = {k: v["step_seconds"]["hyper"][0] for k, v in figures.items()}
    choice = min(step, key=step.get)
    plan = {"compile": choice == "compiled", "step_seconds": step[choice], "steps_timed": step,
            "warmup_seconds": figures[choice]["warmup_seconds"]["hyper"],
            "batch": s["batch"], "window": s["window"], "call1_seconds": time.time() - t0}
    (work / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    (out / "call1.json").write_text(json.dumps({"plan": plan, "bench": figures}, indent=1) + "\n")
    log(f"plan: {json.dumps(plan)}")


def data_sources(corpus: Path, weights: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The train config's ``data:`` list over the corpus: one source per domain and origin, origins in build
    order, so that the sources of earlier origins keep their place (and their cached windows) when a later
    origin is added.  ``weights``: share of windows per domain, split among its origins by their tokens."""
    summary_path = corpus / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"domains": {}}
    out = []
    for origin in ORIGINS:
        for d in DOMAINS:
            if not sorted((corpus / d).glob(f"{origin}-*.jsonl")):
                continue
            weight = 1.0
            if weights is not None:
                origins = summary["domains"].get(d, {}).get("origins", {})
                total = sum(o.get("tokens", 0) for o in origins.values()) or 1
                weight = max(weights.get(d, 0.0) * origins.get(origin, {}).get("tokens", 0) / total, 1e-6)
            out.append({"path": str(corpus / d), "kind": "chat" if d == "chat" else "jsonl",
                        "glob": [f"{origin}-*.jsonl"], "weight": weight})
    return out


def _train_config(args: argparse.Namespace, work: Path, **overrides: Any) -> Any:
    sys.path.insert(0, str(work / "repo" / "src"))
    from hypervocab.training.config import TrainConfig

    s = _settings(args)
    return TrainConfig.from_file(HERE / "train-gpu.yaml", base_model=str(work / "base"),
                                 output_dir=str(work / "run"), cache_dir=str(work / "windows"),
                                 batch_size=s["batch"], window=s["window"], **overrides)


def cmd_prepare(args: argparse.Namespace) -> None:
    """Stage 1: the corpus of the image's trees and part 1, and their windows; stage 2: part 2 added."""
    try:
        _prepare(args)
    except BaseException as e:
        (args.work / f"prepare-{args.stage}.failed").write_text(repr(e) + "\n")
        raise


def _prepare(args: argparse.Namespace) -> None:
    work, s = args.work, _settings(args)
    t0 = time.time()
    corpus = work / "corpus"
    build = [sys.executable, HERE / "corpus.py", "build", "--out", corpus, "--pack", work / "carry",
             "--source", "local" if args.toy else "image", "--tokenizer", work / "base",
             "--heldout", work / "carry" / "heldout-lines.bin"]
    if s["corpus_mb"]:
        build += ["--max-mb-per-domain", str(s["corpus_mb"])]
    run(build)
    sys.path.insert(0, str(work / "repo" / "src"))
    from hypervocab.config import bind_config
    from hypervocab.tokenizer import load_tokenizer
    from hypervocab.training.data import build_windows

    config = _train_config(args, work, data=data_sources(corpus))
    tok = load_tokenizer(config.base_model)  # the trainer's own call: the windows' cache key names this path
    codec = bind_config(config.hyper, tok).codec()
    train_set, eval_set = build_windows(config.data, tok, codec, window=config.window,
                                        eval_fraction=config.eval_fraction, seed=config.seed,
                                        cache_dir=config.cache_dir, num_workers=config.num_workers, progress=False)
    facts = {"stage": args.stage, "seconds": time.time() - t0, "train_windows": len(train_set),
             "eval_windows": len(eval_set), "base_tokens": int(train_set.base_tokens.sum()),
             "codes": int(train_set.n_codes.sum()), "sources": len(config.data)}
    (work / f"prepare-{args.stage}.done").write_text(json.dumps(facts) + "\n")
    log(f"prepare {args.stage}: {json.dumps(facts)}")


def _wait_for(path: Path, seconds: float, what: str) -> None:
    end = time.time() + seconds
    while not path.is_file():
        if path.with_suffix(".failed").is_file():
            raise SystemExit(f"{what} failed: {path.with_suffix('.failed').read_text().strip()}")
        if time.time() > end:
            raise SystemExit(f"{what} did not finish in {seconds:.0f} s")
        time.sleep(1)


def cmd_call2(args: argparse.Namespace) -> None:
    t0 = time.time()
    work, s = args.work, _settings(args)
    deadline = t0 + s["budget"]
    out = _out()
    carry = work / "carry"
    for p in (args.carry or CARRY / "gpu2").iterdir():
        shutil.copyfile(p, carry / p.name)
    env = _env(work)
    plan = json.loads((work / "plan.json").read_text())
    try:
        # the base model: the GGUF file's two halves, decompressed and converted beside the tokenizer
        gguf = work / "gguf" / GGUF_NAME
        gguf.parent.mkdir(exist_ok=True)
        with open(gguf, "wb") as f:
            xz = subprocess.Popen(["xz", "-d", "-c", "-T0"], stdin=subprocess.PIPE, stdout=f)
            for part in ("model.gguf.xz.1", "model.gguf.xz.2"):
                xz.stdin.write((carry / part).read_bytes())
            xz.stdin.close()
            if xz.wait():
                raise SystemExit("the GGUF file did not decompress")
        convert = subprocess.Popen([sys.executable, "-c", "import sys; from hypervocab.pretrained import convert_gguf; "
                                    "convert_gguf(sys.argv[1], sys.argv[2])", str(gguf), str(work / "converted")],
                                   env=env)
        _wait_for(work / "prepare-1.done", max(60.0, deadline - time.time() - 420), "prepare 1")
        prep = [sys.executable, work / "repo" / "recipes" / "smollm2-135m" / "gpu_run.py", "prepare", "2", "--work",
                work] + (["--toy"] if args.toy else [])
        run(prep, env=env, logfile=work / "prepare-2.log")
        if convert.wait():
            raise SystemExit("the GGUF file did not convert")
        for name in ("model.safetensors", "config.json", "generation_config.json"):
            if (work / "converted" / name).is_file():
                shutil.copyfile(work / "converted" / name, work / "base" / name)
        # train until the deadline leaves time to evaluate and pack
        sys.path.insert(0, str(HERE))
        from corpus import data_weights

        summary = json.loads((work / "corpus" / "summary.json").read_text())
        seconds = deadline - time.time() - s["eval_seconds"]
        # start-up (model, cached windows) and, when compiled, the compilation come out of the same time
        steps = max(1, int((seconds - 30 - plan.get("warmup_seconds", 0.0)) / plan["step_seconds"]))
        steps = min(steps, s["max_steps"] or steps)
        config = _train_config(args, work, compile=plan["compile"], max_steps=steps, max_minutes=seconds / 60,
                               data=data_sources(work / "corpus", data_weights(summary, 48_000 * steps, 4.0)))
        config.save(work / "train.json")
        log(f"training {steps} steps of {config.batch_size} x {config.window} codes, for at most {seconds:.0f} s")
        code = run([sys.executable, "-m", "hypervocab.cli.main", "train", "--config", work / "train.json"], env=env,
                   check=False, logfile=work / "train.log")
        if code == 0:
            left = deadline - time.time() - 20
            frac = min(1.0, max(0.1, left / max(1.0, s["eval_seconds"] - 20)))
            run([sys.executable, work / "repo" / "recipes" / "smollm2-135m" / "evaluate_run.py", work / "run",
                 "--base-model", work / "base", "--heldout", work / "heldout", "--max-bytes",
                 str(int(s["eval_bytes"] * frac)), "--device", s["device"], "--new-tokens", str(s["new_tokens"]),
                 "--out", out / "eval.json"], env=env, check=False, logfile=work / "eval.log")
    finally:
        _bring_back(work, out, plan, t0)


def _bring_back(work: Path, out: Path, plan: dict[str, Any], t0: float) -> None:
    """At most 8 files of at most 16 MB: the run in float16 (one archive), the figures, the logs."""
    run_dir = work / "run"
    if (run_dir / "hypervocab_config.json").is_file():
        sys.path.insert(0, str(HERE))
        from ship import _half

        half = work / "run-half"
        shutil.rmtree(half, ignore_errors=True)
        half.mkdir()
        for p in run_dir.iterdir():
            if p.suffix == ".safetensors":
                _half(p, half / p.name)
            elif p.is_file():
                shutil.copyfile(p, half / p.name)
        with tarfile.open(out / "run.tar.xz", "w:xz", preset=6) as tar:
            tar.add(half, arcname="run")
    for name in ("train.json", "corpus/summary.json"):
        if (work / name).is_file():
            shutil.copyfile(work / name, out / Path(name).name.replace("summary", "corpus-summary"))
    logs = [work / n for n in ("prepare-1.log", "prepare-2.log", "bench.log", "train.log", "eval.log")]
    with open(out / "logs.txt", "w") as f:
        for p in logs:
            if p.is_file():
                f.write(f"===== {p.name}\n" + p.read_text()[-400_000:] + "\n")
    done = {p.stem: json.loads(p.read_text()) for p in work.glob("prepare-*.done")}
    (out / "call2.json").write_text(json.dumps({"plan": plan, "prepare": done, "call2_seconds": time.time() - t0},
                                               indent=1) + "\n")
    log(f"brought back: {sorted(p.name for p in out.iterdir())}")


# ---------------------------------------------------------------------------------------------- CPU again


def cmd_rehearse(args: argparse.Namespace) -> None:
    """Both calls here, at toy scale, with the same code (CPU; no compile)."""
    if not (CARRY / "gpu1" / "model.gguf.xz.1").is_file():
        cmd_pack(argparse.Namespace(corpus_pack=ROOT / ".cache" / "corpus-pack"))
    work = ROOT / ".cache" / "rehearsal" / "work"
    shutil.rmtree(work, ignore_errors=True)
    env = dict(os.environ, OUT=str(ROOT / ".cache" / "rehearsal" / "out"))
    shutil.rmtree(env["OUT"], ignore_errors=True)
    me = [sys.executable, Path(__file__)]
    t = time.time()
    run([*me, "call1", "--work", work, "--toy", "--no-compile"], env=env)
    log(f"call 1 took {time.time() - t:.0f} s")
    t = time.time()
    run([*me, "call2", "--work", work, "--toy"], env=env)
    log(f"call 2 took {time.time() - t:.0f} s")
    cmd_land(argparse.Namespace(files=Path(env["OUT"]), run=ROOT / ".cache" / "rehearsal" / "landed"))


def cmd_land(args: argparse.Namespace) -> None:
    files = args.files
    if not (files / "run.tar.xz").is_file():
        raise SystemExit(f"{files} holds no run.tar.xz: the run did not finish (see logs.txt there)")
    shutil.rmtree(args.run, ignore_errors=True)
    args.run.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.run.with_name(args.run.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(files / "run.tar.xz") as tar:
        tar.extractall(tmp, filter="data")
    (tmp / "run").rename(args.run)
    shutil.rmtree(tmp)
    for name in ("eval.json", "call1.json", "call2.json", "corpus-summary.json", "train.json"):
        if (files / name).is_file():
            shutil.copyfile(files / name, args.run / f"gpu-{name}")
    log(f"landed the run in {args.run}")
    if (files / "eval.json").is_file():
        sys.path.insert(0, str(HERE))
        from evaluate_run import markdown

        print(markdown(json.loads((files / "eval.json").read_text())))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="fill .carry/gpu1 and .carry/gpu2 (CPU)")
    p.add_argument("--corpus-pack", type=Path, default=ROOT / ".cache" / "corpus-pack", help="corpus.py pack's folder")
    for name in ("call1", "call2"):
        p = sub.add_parser(name, help=f"device call {name[-1]}")
        p.add_argument("--work", type=Path, default=WORK, help="where the run lives between calls (default /root/hv)")
        p.add_argument("--carry", type=Path, help=f"the carried folder (default .carry/gpu{name[-1]})")
        p.add_argument("--toy", action="store_true", help="toy sizes (the rehearsal)")
        if name == "call1":
            p.add_argument("--no-compile", action="store_true", help="do not time the compiled step")
    p = sub.add_parser("prepare", help="corpus and windows, stage 1 or 2 (started by the calls)")
    p.add_argument("stage", choices=("1", "2"))
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--toy", action="store_true")
    sub.add_parser("rehearse", help="both calls here at toy scale")
    p = sub.add_parser("land", help="unpack what call 2 brought back")
    p.add_argument("files", type=Path, help="the folder of the returned files")
    p.add_argument("--run", type=Path, default=ROOT / ".cache" / "runs" / "smollm2-135m-gpu", help="where the run goes")
    args = parser.parse_args(argv)
    {"pack": cmd_pack, "call1": cmd_call1, "call2": cmd_call2, "prepare": cmd_prepare, "rehearse": cmd_rehearse,
     "land": cmd_land}[args.cmd](args)


if __name__ == "__main__":
    main()
