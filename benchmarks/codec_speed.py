#!/usr/bin/env python
"""Speed and memory of hypervocab's LZW codec against the public zip2zip codec and the Python oracle.

Everything runs in one process on the same realistic ids: the CPython standard
library (every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, recursively,
``site-packages`` excluded, sorted, unreadable files skipped) tokenized file by
file with the real SmolLM2 tokenizer.  The id stream is cached in
``.cache/stdlib_smollm2_ids.npy`` (delete it, or pass ``--rebuild-cache``, to
tokenize again).

Rows (median of ``--repeats`` timed runs after one warm-up, ``time.perf_counter``):

  a. ``encode`` of one sequence of ``--n-ids`` ids (ours: NumPy int64 array;
     public: Python list, converted before timing); codes must be identical.
  b. ``decode`` of those codes; the ids must round-trip exactly.
  c. ``encode_batch`` of ``--batch-seqs`` consecutive 2048-id chunks: ours from a
     ``[B, 2048]`` array on all cores, ours from a list of lists (conversion
     included), public ``batch_encode`` of the list of lists.
  d. one online decoding step: ``DecoderState.push_batch`` over B states (one
     code each, a prebuilt int64 array per step) against
     ``CodebookManager.update_codebooks`` (prebuilt lists), for B = 1 and 16; the
     codes are those of B different chunks, stepped through together; a walk is
     timed whole (at least 21 runs, the implementations taking turns).  Info rows: push_batch given Python
     lists, and ``DecoderState.push(int)`` of a single state.
  e. peak memory of rows a and b, each implementation in a fresh subprocess:
     peak RSS (Linux: ``VmHWM``, reset just before the call; elsewhere
     ``ru_maxrss``) minus the RSS just before the call.

The oracle (``hypervocab.reference_codec``) runs once on a smaller slice
(``--oracle-ids``) and is scaled to ids/s.  The public codec is skipped when
``zip2zip_compression`` does not import.  The table goes to stdout and, with the
raw numbers, to ``benchmarks/results/codec_speed.md`` / ``.json``.

    python benchmarks/codec_speed.py            # the full run (a few minutes on 2 cores)
    python benchmarks/codec_speed.py --quick    # a fast check
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE_FILE = ROOT / ".cache" / "stdlib_smollm2_ids.npy"
RESULTS_STEM = ROOT / "benchmarks" / "results" / "codec_speed"
CHUNK = 2048  # ids per sequence in rows c and d
STEP_BATCHES = (1, 16)  # batch sizes of row d
MIN_STEP_REPEATS = 21  # row d times whole walks of a few ms each: at least this many runs
FULL = {"n_ids": 10_000_000, "batch_seqs": 2048, "repeats": 5, "oracle_ids": 200_000}
QUICK = {"n_ids": 1_000_000, "batch_seqs": 256, "repeats": 3, "oracle_ids": 50_000}
GOAL_SPEEDUP = 5.0  # ours must be at least this many times faster than public on rows a, b, c

T = TypeVar("T")


# --------------------------------------------------------------------------- settings and data


@dataclass(frozen=True)
class Settings:
    """Codec settings shared by all three implementations."""

    V: int
    C: int
    M: int
    pad: int
    disabled: list[int]  # includes pad

    def ours(self) -> Any:
        from hypervocab import LZWCodec

        return LZWCodec(self.V, self.C, self.M, disabled_ids=self.disabled, pad_id=self.pad)

    def public(self) -> Any:
        from zip2zip_compression import LZWCompressor

        return LZWCompressor(self.V, self.C, self.M, self.pad, list(self.disabled))

    def public_manager(self) -> Any:
        from zip2zip_compression import CodebookManager, CompressionConfig

        return CodebookManager(CompressionConfig(self.V, self.C, self.M, self.pad, list(self.disabled)))


def stdlib_sources() -> list[Path]:
    """Every ``*.py`` file of the standard library (``site-packages`` excluded), sorted."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.relative_to(lib).parts and p.is_file())


def load_tokenizer() -> Any:
    """The real SmolLM2 tokenizer, from the folder ``scripts/assets.py`` prepares."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from assets import smollm2_tokenizer_dir
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))


def tokenize_stdlib(tok: Any, cache: Path, rebuild: bool) -> np.ndarray:
    """The stdlib as one int64 id stream (each file tokenized alone, no special tokens), cached."""
    if cache.exists() and not rebuild:
        return np.load(cache)
    from tqdm import tqdm

    files = stdlib_sources()
    parts: list[np.ndarray] = []
    skipped = 0
    group = 32  # files per tokenizer call: the fast tokenizer runs a call's texts in parallel
    with tqdm(total=len(files), unit="file", desc="tokenizing stdlib") as bar:
        for lo in range(0, len(files), group):
            texts = []
            for path in files[lo: lo + group]:
                try:
                    texts.append(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):
                    skipped += 1
            if texts:
                for ids in tok(texts, add_special_tokens=False)["input_ids"]:
                    parts.append(np.asarray(ids, dtype=np.int64))
            bar.update(len(files[lo: lo + group]))
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    print(f"tokenized {len(files) - skipped} files ({skipped} unreadable skipped): {len(stream):,} ids")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npy")
    np.save(tmp, stream)
    tmp.replace(cache)  # atomic: an interrupted run never leaves a truncated cache
    return stream


def take(stream: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` ids of the stream, repeating it when it is shorter."""
    if len(stream) == 0:
        raise SystemExit("the id stream is empty")
    return np.ascontiguousarray(np.resize(stream, n).astype(np.int64))


# --------------------------------------------------------------------------- timing


def bench(fn: Callable[[Any], T], repeats: int, setup: Callable[[], Any] = lambda: None,
          warmup: bool = True) -> tuple[float, list[float], T]:
    """Median seconds of ``fn(setup())`` over ``repeats`` runs (after a warm-up), all times, and the last result."""
    if warmup:
        fn(setup())
    times: list[float] = []
    result: Any = None
    for _ in range(repeats):
        arg = setup()
        result = None
        gc.collect()
        t0 = time.perf_counter()
        result = fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def bench_interleaved(variants: dict[str, tuple[Callable[[Any], Any], Callable[[], Any]]], repeats: int
                      ) -> tuple[dict[str, float], dict[str, list[float]], dict[str, Any]]:
    """Like :func:`bench` for several ``(fn, setup)`` at once, taking turns in every round.

    Each implementation then sees the same conditions (a busy neighbour, a frequency
    change), which keeps their ratio steady on a noisy machine.  Returns medians,
    all times and the last results, by name.
    """
    for fn, setup in variants.values():
        fn(setup())
    times: dict[str, list[float]] = {name: [] for name in variants}
    last: dict[str, Any] = {}
    for _ in range(repeats):
        for name, (fn, setup) in variants.items():
            arg = setup()
            gc.collect()
            t0 = time.perf_counter()
            last[name] = fn(arg)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, times, last


@dataclass
class Row:
    """One line of the table; ``None`` where an implementation was not run."""

    key: str
    what: str
    unit: str  # "ids/s", "us/step" or "MB"
    ours: float | None = None
    public: float | None = None
    oracle: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.public:
            return None
        return self.ours / self.public


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ids/s":
        return f"{value / 1e6:,.2f} M/s" if value >= 1e5 else f"{value / 1e3:,.1f} k/s"
    if unit == "us/step":
        return f"{value:,.2f} µs"
    return f"{value:,.1f} MB"


def markdown(rows: list[Row]) -> str:
    lines = ["| what | ours | public | oracle | ours/public |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}x"
        cells = (r.what, fmt(r.ours, r.unit), fmt(r.public, r.unit), fmt(r.oracle, r.unit), ratio)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(rows: list[Row]) -> list[str]:
    """PASS/FAIL lines for the targets: >= 5x public on a-c, push_batch not slower, memory not above."""
    out = []
    for r in rows:
        if r.ratio is None:
            continue
        if r.key in ("a", "b", "c_array", "c_lists"):
            ok, goal = r.ratio >= GOAL_SPEEDUP, f"ours/public >= {GOAL_SPEEDUP:g}"
        elif r.key in ("d_1", "d_16"):
            ok, goal = r.ratio <= 1.0, "ours/public <= 1 (not slower)"
        elif r.key.startswith("e_"):
            ok, goal = r.ratio <= 1.0, "ours/public <= 1 (not more memory)"
        else:
            continue
        out.append(f"- {'PASS' if ok else 'FAIL'}: {r.what}: {r.ratio:.2f} ({goal})")
    return out


# --------------------------------------------------------------------------- peak memory (row e)


def current_rss_kib() -> int:
    """Resident set size now, in KiB (Linux: /proc; elsewhere the peak is all we can read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return peak_rss_kib()


def peak_rss_kib() -> int:
    """Peak RSS in KiB: ``VmHWM`` on Linux, else ``ru_maxrss``.

    On Linux ``ru_maxrss`` is the larger of this process's peak and a peak kept
    across ``exec``: a child started by a big parent reports the parent's peak
    (and clearing the counter does not touch that part), so it reads ``VmHWM``,
    the same counter without the inherited part.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0) so setup does not count; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(spec: str, workdir: Path) -> None:
    """Child side of row e: run one call (``impl:op``) on the saved inputs and print its memory as JSON."""
    impl, op = spec.split(":")
    cfg = json.loads((workdir / "settings.json").read_text())
    settings = Settings(**cfg)
    arr = np.load(workdir / ("ids.npy" if op == "encode" else "codes.npy"))
    if impl == "ours":
        codec = settings.ours()
        data: Any = arr
        call = codec.encode if op == "encode" else codec.decode
        call(arr[:1000])  # load lazily initialised code outside the measurement
    else:
        codec = settings.public()
        data = arr.tolist()
        del arr
        call = codec.encode if op == "encode" else codec.decode
        call(data[:1000])
    gc.collect()
    was_reset = reset_peak_rss()
    before = current_rss_kib()
    out = call(data)
    peak = peak_rss_kib()
    del out
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "peak_kib": peak, "peak_reset": was_reset, "ru_maxrss": maxrss}))


def measure_memory(impl: str, op: str, workdir: Path) -> dict[str, Any]:
    """Run :func:`memory_probe` in a fresh interpreter; returns its numbers plus ``mb``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-probe", f"{impl}:{op}",
           "--_probe-dir", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {impl}:{op} failed:\n{proc.stderr}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["mb"] = max(0, res["peak_kib"] - res["before_kib"]) * 1024 / 1e6
    return res


# --------------------------------------------------------------------------- the benchmark


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, check=False).stdout.strip() or None
    except OSError:
        git = None
    import hypervocab

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "cpu": cpu, "git": git,
            "hypervocab_path": str(Path(hypervocab.__file__).parent),
            "python": platform.python_version(), "numpy": np.__version__, "hypervocab": version("hypervocab"),
            "zip2zip-compression": version("zip2zip-compression")}


def public_available(skip: bool) -> bool:
    if skip:
        print("public codec: skipped (--skip-public)")
        return False
    try:
        import zip2zip_compression  # noqa: F401
    except ImportError as e:
        print(f"public codec: skipped (zip2zip_compression does not import: {e})")
        return False
    return True


def run(args: argparse.Namespace) -> int:
    from hypervocab import DecoderState
    from hypervocab.reference_codec import ReferenceDecoder, reference_decode, reference_encode
    from hypervocab.tokenizer import default_disabled_ids

    info = machine()
    print(f"machine: {info['cpu_count']} CPUs ({info['cpu']}), {info['platform']}, Python {info['python']}")
    print(f"hypervocab: {info['hypervocab_path']} (repo at {info['git']})")
    have_public = public_available(args.skip_public)

    tok = load_tokenizer()
    stream = tokenize_stdlib(tok, CACHE_FILE, args.rebuild_cache)
    disabled = sorted(set(default_disabled_ids(tok)) | {tok.pad_token_id})
    settings = Settings(V=len(tok), C=args.max_codebook_size, M=args.max_subtokens, pad=tok.pad_token_id,
                        disabled=disabled)
    print(f"ids: {len(stream):,} in the stdlib stream; V={settings.V} C={settings.C} M={settings.M} "
          f"pad={settings.pad} disabled={len(disabled)} ids; repeats={args.repeats}")
    ours = settings.ours()
    pub = settings.public() if have_public else None
    frozen = frozenset(disabled)
    rows: list[Row] = []
    R = args.repeats
    V, C, M = settings.V, settings.C, settings.M

    # a. encode of one long sequence --------------------------------------------------------
    n = args.n_ids
    ids = take(stream, n)
    t_ours, times, codes = bench(lambda _: ours.encode(ids), R)
    row = Row("a", f"a. encode, 1 sequence of {n:,} ids", "ids/s", ours=n / t_ours, raw={"ours_s": times})
    codes_list = codes.tolist()
    print(f"a. ours: {len(codes):,} codes ({n / max(len(codes), 1):.3f} ids per code)")
    if pub is not None:
        ids_list = ids.tolist()
        t_pub, times, p_out = bench(lambda _: pub.encode(ids_list), R)
        assert p_out[0] == codes_list, "public and ours disagree on encode"
        print("a. codes of ours and public match")
        row.public, row.raw["public_s"] = n / t_pub, times
        del p_out
    k = min(args.oracle_ids, n)
    oracle_ids = ids[:k].tolist()
    t0 = time.perf_counter()
    o_codes, _ = reference_encode(oracle_ids, V, C, M, frozen)
    t_or = time.perf_counter() - t0
    assert o_codes == ours.encode(ids[:k]).tolist(), "oracle and ours disagree on encode"
    row.oracle, row.raw["oracle_s"], row.raw["oracle_ids"] = k / t_or, [t_or], k
    rows.append(row)

    # b. decode of those codes ---------------------------------------------------------------
    t_ours, times, out = bench(lambda _: ours.decode(codes), R)
    assert np.array_equal(out, ids), "ours does not round-trip"
    row = Row("b", f"b. decode, {len(codes):,} codes → {n:,} ids", "ids/s", ours=n / t_ours, raw={"ours_s": times})
    del out
    if pub is not None:
        t_pub, times, p_out = bench(lambda _: pub.decode(codes_list), R)
        assert p_out[0] == ids_list, "public does not round-trip"
        print("b. ids of ours and public match (exact round trip)")
        row.public, row.raw["public_s"] = n / t_pub, times
        del p_out, ids_list
    t0 = time.perf_counter()
    o_ids, _ = reference_decode(o_codes, V, C, M, frozen)
    t_or = time.perf_counter() - t0
    assert o_ids == oracle_ids, "oracle does not round-trip"
    row.oracle, row.raw["oracle_s"] = k / t_or, [t_or]
    rows.append(row)
    codes_list = None  # free it before the batch section

    # c. encode_batch of 2048-id chunks -------------------------------------------------------
    B = args.batch_seqs
    mat = take(stream, B * CHUNK).reshape(B, CHUNK)
    lists = mat.tolist()
    total = B * CHUNK
    t_arr, times_arr, enc = bench(lambda _: ours.encode_batch(mat), R)
    t_lst, times_lst, enc_l = bench(lambda _: ours.encode_batch(lists), R)
    batch_codes = [c.tolist() for c in enc.codes]
    assert batch_codes == [c.tolist() for c in enc_l.codes], "ours disagrees with itself on array vs lists"
    row_a = Row("c_array", f"c. encode_batch, [{B}, {CHUNK}] int64 array, all cores", "ids/s", ours=total / t_arr,
                raw={"ours_s": times_arr})
    row_l = Row("c_lists", f"c. encode_batch, {B} Python lists of {CHUNK} ids", "ids/s", ours=total / t_lst,
                raw={"ours_s": times_lst})
    if pub is not None:
        t_pub, times, p_out = bench(lambda _: pub.batch_encode(lists, False, False, None), R)
        assert p_out[0] == batch_codes, "public and ours disagree on encode_batch"
        print("c. batch codes of ours and public match")
        for r in (row_a, row_l):
            r.public, r.raw["public_s"] = total / t_pub, times
        del p_out
    k_seq = max(1, min(B, args.oracle_ids // CHUNK))
    t0 = time.perf_counter()
    o_batch = [reference_encode(s, V, C, M, frozen)[0] for s in lists[:k_seq]]
    t_or = time.perf_counter() - t0
    assert o_batch == batch_codes[:k_seq], "oracle and ours disagree on encode_batch"
    for r in (row_a, row_l):
        r.oracle, r.raw["oracle_s"], r.raw["oracle_seqs"] = k_seq * CHUNK / t_or, [t_or], k_seq
    rows += [row_a, row_l]
    lists = enc_l = None  # free them

    # d. one online decoding step over B states -------------------------------------------------
    RD = max(R, MIN_STEP_REPEATS)  # a walk takes milliseconds: more runs steady the median
    for nb in STEP_BATCHES:
        if nb > len(batch_codes):
            print(f"d. B={nb}: skipped, only {len(batch_codes)} sequences in row c")
            continue
        streams = batch_codes[:nb]
        steps = min(len(s) for s in streams)
        grid = np.array([s[:steps] for s in streams], dtype=np.int64)  # [nb, steps]
        cols = [np.ascontiguousarray(grid[:, t]) for t in range(steps)]
        col_lists = [[[int(c)] for c in grid[:, t]] for t in range(steps)]
        col_ints = [grid[:, t].tolist() for t in range(steps)]
        fresh_states: Callable[[], Any] = lambda: [ours.decoder_state() for _ in range(nb)]  # noqa: E731

        def walk_ours(states: list[Any]) -> list[Any]:
            for col in cols:
                DecoderState.push_batch(states, col)
            return states

        def walk_ours_lists(states: list[Any]) -> list[Any]:
            for col in col_ints:
                DecoderState.push_batch(states, col)
            return states

        variants: dict[str, tuple[Callable[[Any], Any], Callable[[], Any]]] = {
            "array": (walk_ours, fresh_states), "list": (walk_ours_lists, fresh_states)}
        if nb == 1:  # the single-state API a generation loop of one sequence would call, for reference
            ints = grid[0].tolist()

            def walk_push(state: Any) -> Any:
                for c in ints:
                    state.push(c)
                return state

            variants["push"] = (walk_push, ours.decoder_state)
        mgr = settings.public_manager() if have_public else None
        if mgr is not None:

            def walk_public(_: None) -> Any:
                for col in col_lists:
                    mgr.update_codebooks(col)
                return mgr

            variants["public"] = (walk_public, mgr.reset)
        med, times, last = bench_interleaved(variants, RD)

        states = last["array"]
        for b, st in enumerate(states):  # online == offline, whatever the input kind
            assert st.codebook == ours.decode(grid[b], return_codebook=True)[1], "push_batch != offline decode"
        assert all(a == b for a, b in zip(states, last["list"])), "push_batch differs between array and list codes"
        if nb == 1:
            assert last["push"] == states[0], "push != push_batch"
        if mgr is not None:
            theirs = mgr.get_codebooks()
            for b, st in enumerate(states):
                assert st.codebook.to_dict() == theirs[b].to_dict(), "public and ours disagree on online decoding"

        def walk_oracle(decs: list[ReferenceDecoder]) -> list[ReferenceDecoder]:
            for col in col_ints:
                for dec, c in zip(decs, col):
                    dec.push(c)
            return decs

        t_or, times_or, decs = bench(walk_oracle, 1,
                                     setup=lambda: [ReferenceDecoder(V, C, M, frozen) for _ in range(nb)],
                                     warmup=False)
        assert [d.entries for d in decs] == [[tuple(p) for p in st.codebook.to_dict().values()] for st in states]

        labels = {"array": (f"d_{nb}", f"d. push_batch, B={nb}, int64 array codes ({steps} steps)"),
                  "list": (f"d_{nb}_list", f"d. push_batch, B={nb}, Python list codes (info)"),
                  "push": ("d_push",
                           f"d. DecoderState.push(int), 1 state ({steps} steps; info, vs update_codebooks B=1)")}
        for kind, (key, what) in labels.items():
            if kind not in med:
                continue
            row = Row(key, what, "us/step", ours=med[kind] / steps * 1e6, oracle=t_or / steps * 1e6,
                      raw={"ours_s": times[kind], "steps": steps, "oracle_s": times_or})
            if "public" in med:
                row.public, row.raw["public_s"] = med["public"] / steps * 1e6, times["public"]
            rows.append(row)
    print("d. online states of ours equal offline decode" + (" and public's codebooks" if have_public else ""))
    del batch_codes, enc

    # e. peak memory of rows a and b, in fresh processes ----------------------------------------------------
    if not args.skip_memory:
        with tempfile.TemporaryDirectory(prefix="codec_speed_") as tmp:
            work = Path(tmp)
            (work / "settings.json").write_text(json.dumps(asdict(settings)))
            np.save(work / "ids.npy", ids)
            np.save(work / "codes.npy", codes)
            for op, label in (("encode", f"e. peak memory, encode {n:,} ids"),
                              ("decode", f"e. peak memory, decode {len(codes):,} codes")):
                row = Row(f"e_{op}", label, "MB")
                res = measure_memory("ours", op, work)
                row.ours, row.raw["ours"] = res["mb"], res
                if have_public:
                    res = measure_memory("public", op, work)
                    row.public, row.raw["public"] = res["mb"], res
                if not row.raw["ours"]["peak_reset"]:
                    row.what += " (peak counter not resettable: includes setup)"
                rows.append(row)

    table = markdown(rows)
    goal_lines = goals(rows)
    print()
    print(table)
    if goal_lines:
        print("\nGoals:\n" + "\n".join(goal_lines))
    write_results(args, info, settings, len(stream), len(codes), rows, table, goal_lines)
    return 0


def write_results(args: argparse.Namespace, info: dict[str, Any], settings: Settings, stream_len: int,
                  n_codes: int, rows: list[Row], table: str, goal_lines: list[str]) -> None:
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Codec speed\n\nMachine: {info['cpu_count']} CPUs ({info['cpu']}), {info['platform']}, "
              f"Python {info['python']}, NumPy {info['numpy']}, zip2zip-compression {info['zip2zip-compression']}\n\n"
              f"Ids: CPython stdlib tokenized with SmolLM2 ({stream_len:,} ids); V={settings.V}, C={settings.C}, "
              f"M={settings.M}, pad={settings.pad}, {len(settings.disabled)} disabled ids; "
              f"median of {args.repeats} runs after a warm-up; oracle on {args.oracle_ids:,} ids, scaled.\n\n")
    md = header + table + "\n" + ("\nGoals:\n\n" + "\n".join(goal_lines) + "\n" if goal_lines else "")
    payload = {"machine": info, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
               "settings": asdict(settings) | {"disabled": len(settings.disabled)}, "stream_ids": stream_len,
               "row_a_codes": n_codes,
               "rows": [{"key": r.key, "what": r.what, "unit": r.unit, "ours": r.ours, "public": r.public,
                         "oracle": r.oracle, "ours_over_public": r.ratio, "raw": r.raw} for r in rows],
               "goals": goal_lines}
    for path, text in ((stem.with_suffix(".md"), md),
                       (stem.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"\nwrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a fast check: " + ", ".join(f"{k}={v:_}" for k, v in QUICK.items()))
    p.add_argument("--n-ids", type=int, help=f"ids in the single sequence of rows a, b, e (default {FULL['n_ids']:_})")
    p.add_argument("--batch-seqs", type=int, help=f"{CHUNK}-id sequences in row c (default {FULL['batch_seqs']})")
    p.add_argument("--repeats", type=int,
                   help=f"timed runs per measurement, median reported (default {FULL['repeats']})")
    p.add_argument("--oracle-ids", type=int, help=f"ids the slow oracle runs on (default {FULL['oracle_ids']:_})")
    p.add_argument("--max-codebook-size", "-C", type=int, default=2048, help="C (default 2048)")
    p.add_argument("--max-subtokens", "-M", type=int, default=4, help="M (default 4)")
    p.add_argument("--skip-public", action="store_true", help="do not run the public codec even if it imports")
    p.add_argument("--skip-memory", action="store_true", help="leave out row e (peak memory)")
    p.add_argument("--rebuild-cache", action="store_true", help=f"tokenize again even if {CACHE_FILE.name} exists")
    p.add_argument("--out", help=f"output path without suffix (default {RESULTS_STEM.relative_to(ROOT)}, "
                                 "with --quick ..._quick)")
    p.add_argument("--_memory-probe", dest="_memory_probe", help=argparse.SUPPRESS)
    p.add_argument("--_probe-dir", dest="_probe_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = str(RESULTS_STEM.with_name(RESULTS_STEM.name + ("_quick" if args.quick else "")))
    for key in ("n_ids", "batch_seqs", "repeats", "oracle_ids", "max_subtokens"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.max_codebook_size < 0:
        p.error("--max-codebook-size must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._memory_probe:
        memory_probe(args._memory_probe, Path(args._probe_dir))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
