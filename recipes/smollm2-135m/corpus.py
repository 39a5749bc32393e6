#!/usr/bin/env python
"""The training corpus at scale for uptraining SmolLM2-135M: real text, none of it held out.

Two sources make the corpus (see DATA.md beside this file for the mixture, sizes and licences):

* the Python package trees of an interpreter's site-packages (``--source image``: the GPU machine's own
  packages; ``--source local``: the same packages, pinned, installed without dependencies into
  ``.cache/corpora/image-packages``, plus this environment's torch): Python, C/C++/CUDA headers, other code
  (Cython, stubs, CMake), CSV, JSON, YAML and package READMEs;
* a small carried *pack* (two ``tar.xz`` parts, 24 MB in all) of what those trees lack: English prose, prose in
  many languages, translation catalogues, JSON, YAML and chat, gathered here from registry packages.

Nothing in the corpus is held out by ``prepare_data.py``: files of its domain roots that it would hold out are
left out by the same path hash, and every document is checked against a set of 64-bit hashes of the held-out
files' non-trivial lines (``heldout-lines.bin``): one sharing 30% or more of its lines with them is dropped.
Exact duplicates are dropped by a hash of their text.

    python recipes/smollm2-135m/corpus.py pack --out .cache/corpus-pack
    python recipes/smollm2-135m/corpus.py build --out .cache/corpus --pack .cache/corpus-pack --source local
    python recipes/smollm2-135m/corpus.py yaml --out .cache/corpus
"""

from __future__ import annotations

import argparse
import array
import gzip
import hashlib
import importlib.util
import io
import json
import lzma
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.parser import HeaderParser
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORPORA = ROOT / ".cache" / "corpora"
IMAGE_PACKAGES = CORPORA / "image-packages"  # --source local: the GPU image's packages, text only, never imported
PACK_PACKAGES = CORPORA / "pack-packages"  # registry packages the pack is gathered from
DEBIAN = CORPORA / "debian"  # Debian packages, downloaded and unpacked here (nothing is installed)

SEED, HELDOUT_FRACTION = 0, 0.1  # prepare_data.py's split: it must not change, or evaluation text could train
MAX_FILE = 256 << 10  # larger files are skipped
MIN_DOC = 64  # smaller documents carry nothing to learn
MIN_LINE = 20  # lines shorter than this (after strip) are too common to mean overlap
OVERLAP = 0.30  # a document sharing this share of its non-trivial lines with held-out text is dropped
SHARD = 32 << 20  # bytes of text per JSONL shard
SAMPLE = 512 << 10  # bytes per (domain, origin) tokenized to estimate tokens

# --source local: the GPU image's Python packages, pinned (the image's versions where they are known, else the
# newest of late 2026), as CPython 3.12 / manylinux wheels like the image's. Left out: packages whose wheels are
# large and almost all binary (triton, jaxlib, cupy-cuda13x, onnxruntime, opencv, llvmlite, the nvidia CUDA
# libraries but for their small header wheels); torch comes from this environment.
IMAGE_PINS = ["accelerate==1.15.0", "botorch==0.18.1", "gpytorch==1.15.2", "linear-operator==0.6.1", "jax==0.11.2", "flax==0.12.12", "optax==0.2.8", "chex==0.1.92", "equinox==0.13.8", "diffrax==0.7.2", "lineax==0.1.1", "optimistix==0.1.0", "numpyro==0.21.0", "orbax-checkpoint==0.12.8", "etils==1.15.0", "treescope==0.1.10", "jaxtyping==0.3.11", "transformers==5.17.0", "peft==0.21.2", "sentence-transformers==6.0.1", "huggingface-hub==1.33.0", "timm==1.0.31", "torchvision==0.26.0", "torchaudio==2.11.0", "torch-geometric==2.8.0.post1", "torchmetrics==1.9.0", "lightning==2.6.6", "pytorch-lightning==2.6.6", "lightning-utilities==0.15.3", "e3nn==0.6.0", "einops==0.8.2", "opt-einsum==3.4.0", "sympy==1.14.0", "mpmath==1.4.1", "scipy==1.18.1", "numpy==2.5.2", "pandas==3.1.1", "scikit-learn==1.9.1", "scikit-image==0.26.0", "statsmodels==0.15.0", "patsy==1.0.3", "formulaic==1.2.2", "matplotlib==3.11.2", "seaborn==0.13.2", "networkx==3.7", "numba==0.68.1", "numba-cuda==0.30.4", "xarray==2026.9.0", "narwhals==2.28.0", "pyarrow==26.0.1", "onnx==1.23.1", "onnxscript==0.7.2", "onnx-ir==1.0.0", "cython==3.3.1", "pygments==2.21.0", "hypothesis==6.170.15", "pytest==9.2.0", "werkzeug==3.1.9", "jinja2==3.1.6", "cmake==4.4.4", "meson==1.12.1", "scikit-build-core==1.1.2", "pybind11==3.1.0", "nanobind==3.1.0", "mpi4py==4.1.2", "tensorboard==2.21.0", "fonttools==4.68.0", "pillow==13.0.0", "lxml==6.1.3", "h5py==3.16.0", "imageio==2.38.1", "tifffile==2026.11.8", "sacrebleu==2.6.0", "rich==15.0.0", "click==8.5.1", "typer==0.29.1", "aiohttp==3.14.5", "httpx==0.28.1", "requests==2.34.2", "urllib3==2.8.0", "setuptools==84.2.1", "coverage==7.17.3", "protobuf==7.36.2", "grpcio==1.85.1", "absl-py==2.5.1", "markdown==3.11.3", "markdown-it-py==4.3.0", "pyparsing==3.3.3", "python-dateutil==4.0.0", "joblib==1.6.0", "tqdm==4.70.1", "toolz==1.2.0", "cloudpickle==3.1.2", "fsspec==2026.9.0", "attrs==26.1.0", "anyio==4.16.0", "wrapt==2.5.2", "multidict==7.2.1", "yarl==1.25.1", "msgpack==1.2.4", "packaging==26.3", "pluggy==1.7.0", "psutil==7.2.2", "regex==2026.11.15", "safetensors==0.8.0", "tiktoken==0.14.0", "tokenizers==0.23.2", "sentencepiece==0.2.3", "typing-extensions==4.16.0", "nvidia-cuda-runtime==13.5.37", "nvidia-nvtx==13.4.92", "cuda-bindings==13.5.0", "cuda-core==1.2.2", "cuda-pathfinder==1.9.0"]
WHEEL_TAGS = ["--python-version", "3.12", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
              "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_17_x86_64",
              "--platform", "manylinux2014_x86_64"]
TORCH_TOPS = ("torch", "torchgen", "functorch")  # --source local: these come from this environment

# the pack's registry packages (text only, never imported)
PACK_PINS = {"sphinx": "sphinx==9.0.4", "wagtail": "wagtail==8.0.1", "allauth": "django-allauth==65.21.1",
             "plone": "plone-app-locales==7.0.4"}
PACK_TOPS = {"sphinx": "sphinx", "wagtail": "wagtail", "allauth": "allauth", "plone": "plone"}
# Debian packages (downloaded, unpacked under .cache/corpora/debian; the newest is taken where a pinned version
# has left the archive, and the manifest records which)
REFERENCE_LANGS = ("de", "en", "es", "fr", "id", "it", "ja", "pt", "pt-br", "zh-cn", "zh-tw")
DEVREF_LANGS = ("de", "fr", "it", "ja", "ru")  # developers-reference translations
MAINT_LANGS = ("ca", "de", "es", "it", "ja", "ru", "zh-cn", "zh-tw")  # maint-guide translations
MAN_LANGS = ("cs", "da", "de", "es", "fi", "fr", "hu", "it", "nl", "pl", "pt-br", "ro", "ru", "sv", "uk")
DEBIAN_PINS = {"cmake-doc": "3.25.1-1", "linux-doc-6.1": "6.1.192-3", "debian-handbook": "11.20220922",
               "ruby-faker": "2.21.0-1", "python-django-doc": "3:3.2.25-0+deb12u3",
               "postgresql-doc-15": "15.18-0+deb12u1", "nodejs-doc": "18.20.4+dfsg-1~deb12u2",
               "git-doc": "1:2.39.5-0+deb12u2", "developers-reference": "12.18", "maint-guide": "1.2.53",
               **{f"debian-reference-{lang}": "2.100" for lang in REFERENCE_LANGS},
               **{f"developers-reference-{lang}": "12.18" for lang in DEVREF_LANGS},
               **{f"maint-guide-{lang}": "1.2.53" for lang in MAINT_LANGS},
               **{f"manpages-{lang}": ("1:4.18.1-1" if lang in ("pl", "hu") else "4.18.1-1") for lang in MAN_LANGS}}

# ------------------------------------------------------------------------------------------------ domains

DOMAINS = ("python", "cpp", "code", "docs", "intl", "json", "yaml", "csv", "po", "chat")
CODE_DOMAINS = {"python", "cpp", "code", "json", "yaml", "csv"}
_EXT = {".py": "python",
        **dict.fromkeys((".h", ".hh", ".hpp", ".hxx", ".h++", ".cuh", ".c", ".cc", ".cpp", ".cxx", ".cu", ".inl",
                         ".ipp", ".tcc"), "cpp"),
        **dict.fromkeys((".pyi", ".pyx", ".pxd", ".pxi", ".cmake", ".sh", ".bash", ".js", ".lua", ".proto", ".mlir",
                         ".td", ".f", ".f90", ".jinja", ".j2", ".toml", ".cfg", ".ini"), "code"),
        ".md": "docs", ".rst": "docs", ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".csv": "csv",
        ".tsv": "csv", ".po": "po"}
_NAMES = {"CMakeLists.txt": "code", "meson.build": "code", "meson.options": "code", "meson_options.txt": "code",
          "README": "docs", "README.txt": "docs", "METADATA": "docs"}
# folders of test data (fixtures, baselines): only code is taken from them
_FIXTURE_DIRS = {"tests", "test", "testing", "fixtures", "testdata", "test_data", "baseline_images", "_testing"}
_SKIP_DIRS = {"__pycache__", ".git", "node_modules", "licenses", "LICENSES"}
# never read: this project, pip's editable-install shims, and anything of the standard library
_SKIP_TOPS = {"hypervocab", "_distutils_hack", "__editable__"}
_GENERATED = re.compile(r"(_pb2(_grpc)?\.pyi?|\.min\.js)$")


def domain_of(rel: str) -> str | None:
    """The corpus domain of a file of a package tree, by its name; ``None`` for what is not taken."""
    parts = rel.split("/")
    name = parts[-1]
    if any(p.endswith(".dist-info") for p in parts[:-1]):
        return "docs" if name == "METADATA" else None
    if _GENERATED.search(name) or name.startswith(("LICENSE", "COPYING", "NOTICE")):
        return None
    d = _NAMES.get(name) or _EXT.get(os.path.splitext(name)[1].lower())
    if d is None:
        return None
    if d not in ("python", "cpp", "code") and _FIXTURE_DIRS.intersection(parts[:-1]):
        return None  # test fixtures and baselines
    return d


# ------------------------------------------------------------------------------------------------ text checks

def line_key(line: str) -> int:
    return int.from_bytes(hashlib.blake2b(line.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def text_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


_ALNUM = re.compile(r"[^\W_]")


def nontrivial_lines(text: str, po: bool = False) -> list[str]:
    """The stripped lines of at least MIN_LINE characters with at least 8 letters or digits (rules such as
    ``=====`` and runs of punctuation are in every file of a kind). Of a ``.po`` catalogue only its translations
    count (the ``msgstr`` lines and their continuations, but not the header entry's): its msgids and header
    fields are the same in every language of a catalogue."""
    lines = []
    state, empty_msgid = "", False
    for raw in text.splitlines():
        line = raw.strip()
        if po:
            if line.startswith("msgid "):
                state, empty_msgid = "msgid", line == 'msgid ""'
            elif line.startswith("msgstr"):
                state = "msgstr"
            elif line.startswith('"'):
                if state == "msgid":
                    empty_msgid = False
            else:
                state = ""
            if state != "msgstr" or empty_msgid:
                continue
        if len(line) >= MIN_LINE and len(_ALNUM.findall(line)) >= 8:
            lines.append(line)
    return lines


def overlap(text: str, heldout: set[int] | frozenset[int], po: bool = False) -> float:
    """Share of the document's non-trivial lines that are lines of held-out text."""
    if not heldout:
        return 0.0
    lines = nontrivial_lines(text, po)
    if not lines:
        return 0.0
    return sum(line_key(line) in heldout for line in lines) / len(lines)


def check(text: str, domain: str, heldout: set[int] | frozenset[int], po: bool = False) -> str | None:
    """Why the document is not taken (``None``: it is)."""
    n = len(text)
    if n < MIN_DOC or not text.strip():
        return "tiny"
    if "\0" in text:
        return "binary"
    lines = text.count("\n") + 1
    longest = max(map(len, text.splitlines()), default=0)
    if domain in ("python", "cpp", "code") and (longest > 1000 or n / lines > 150):
        return "minified"  # generated or minified code
    if longest > 20000 or n / lines > 500:
        return "minified"  # data on one line (documentation strings in JSON may be long)
    if domain in ("python", "cpp", "code"):
        digits = sum(map(text.count, "0123456789"))
        if digits > 0.4 * (n - text.count(" ") - text.count("\n")):
            return "numeric"  # tables of numbers (generated test results), not code
    if overlap(text, heldout, po) >= OVERLAP:
        return "heldout"
    return None


def decode(data: bytes) -> str | None:
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def save_heldout(path: Path, keys: Iterable[int]) -> None:
    arr = array.array("Q", sorted(set(keys)))
    if sys.byteorder == "big":
        arr.byteswap()
    path.write_bytes(arr.tobytes())


def load_heldout(path: Path) -> frozenset[int]:
    arr = array.array("Q")
    arr.frombytes(path.read_bytes())
    if sys.byteorder == "big":
        arr.byteswap()
    return frozenset(arr)


def split_text(text: str, limit: int = 128 << 10) -> list[str]:
    """Long prose cut at blank lines into pieces of at most about ``limit`` bytes."""
    if len(text.encode()) <= MAX_FILE:
        return [text]
    pieces, cur, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        b = len(para.encode()) + 2
        if cur and size + b > limit:
            pieces.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += b
    if cur:
        pieces.append("\n\n".join(cur))
    return pieces


class _HtmlText(HTMLParser):
    """The readable text of a DocBook/Publican HTML page: no head, navigation, scripts or index anchors."""

    BLOCK2 = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "blockquote", "dl", "ul", "ol"}
    BLOCK1 = {"br", "li", "tr", "dt", "dd"}

    SKIP_CLASSES = {"docnav", "navheader", "navfooter", "headerlink", "sphinxsidebar", "related", "footer"}
    SKIP_IDS = {"banner", "title", "hd", "ft", "searchbox"}

    def __init__(self, root_class: str | None = None) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.pre = 0
        self.root_class = root_class  # only the text inside the first element of this class
        self.root_tag: str | None = None
        self.root_depth = 0 if root_class else 1

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if self.skip_tag:
            self.skip_depth += tag == self.skip_tag
            return
        a = dict(attrs)
        classes, ident = set((a.get("class") or "").split()), a.get("id") or ""
        if self.root_class and self.root_tag is None and self.root_class in classes:
            self.root_tag, self.root_depth = tag, 0
        if self.root_tag == tag:
            self.root_depth += 1
        if tag in ("head", "script", "style", "form") or classes & self.SKIP_CLASSES or ident in self.SKIP_IDS:
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK2:
            self.out.append("\n\n")
        elif tag in self.BLOCK1:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if self.root_tag == tag:
            self.root_depth -= 1
            if self.root_depth == 0:
                self.root_tag, self.root_class = "", None  # done: nothing after the root is taken
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCK2:
            self.out.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skip_tag and self.root_depth > 0:
            self.out.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [line.rstrip() for line in "".join(self.out).split("\n")]
        text = "\n".join(line if line.strip() else "" for line in lines)
        return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def html_text(html: str, root_class: str | None = None) -> str:
    p = _HtmlText(root_class)
    p.feed(html)
    p.close()
    return p.text()


# ------------------------------------------------------------------------------------------------ licences

def _dist_license(meta: dict[str, str], classifiers: list[str]) -> str:
    lic = (meta.get("License-Expression") or "").strip()
    if not lic:
        raw = (meta.get("License") or "").strip()
        if raw and len(raw) <= 80 and "\n" not in raw:
            lic = raw
    if not lic:
        found = [c.split("::")[-1].strip() for c in classifiers if c.startswith("License ::")]
        lic = "; ".join(found)
    return lic or "unknown (see the package's licence files)"


def tree_licenses(root: Path) -> dict[str, tuple[str, str]]:
    """top-level name in ``root`` -> (distribution==version, licence), from the dist-info metadata."""
    out: dict[str, tuple[str, str]] = {}
    for info in sorted(root.glob("*.dist-info")):
        meta_file = info / "METADATA"
        if not meta_file.is_file():
            continue
        msg = HeaderParser().parsestr(meta_file.read_text(encoding="utf-8", errors="replace"))
        meta = dict(msg.items())
        dist = f"{meta.get('Name', info.name)}=={meta.get('Version', '?')}"
        lic = _dist_license(meta, msg.get_all("Classifier") or [])
        tops = {info.name}
        record = info / "RECORD"
        if record.is_file():
            for line in record.read_text(encoding="utf-8", errors="replace").splitlines():
                top = line.split(",", 1)[0].split("/", 1)[0]
                if top and not top.startswith(".."):
                    tops.add(top[:-3] if top.endswith(".py") else top)
        for top in sorted(tops):
            out.setdefault(top, (dist, lic))
    return out


def debian_license(copyright_file: Path) -> str:
    """The licence of a Debian package's ``Files: *`` stanza (else its first ``License:`` line)."""
    if not copyright_file.is_file():  # a documentation package may keep it in its main package's folder
        found = sorted(p for p in copyright_file.parents[1].glob("*/copyright") if p.is_file())
        if not found:
            return "unknown"
        copyright_file = found[0]
    text = copyright_file.read_text(encoding="utf-8", errors="replace")
    first = None
    for stanza in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:\s*(.*)$", stanza, re.M)
        lic = re.search(r"^License:\s*(.+)$", stanza, re.M)
        if lic and first is None:
            first = lic.group(1).strip()
        if files and lic and files.group(1).strip() == "*":
            return lic.group(1).strip()
    return first or "unknown"


# ------------------------------------------------------------------------------------------------ installs

def _pip_install(target: Path, pins: list[str], extra: list[str] = ()) -> None:
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--upgrade", "--target",
           str(target), *extra]
    if subprocess.run(cmd + pins, capture_output=True).returncode != 0:  # one bad pin must not lose the rest
        for pin in pins:
            r = subprocess.run(cmd + [pin], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"note: {pin} could not be installed, left out: {r.stderr.strip()[-300:]}", file=sys.stderr)


def ensure_image_packages() -> Path:
    """``--source local``: the image's packages, pinned, text only (never imported) in .cache/corpora."""
    stamp = IMAGE_PACKAGES / ".pins"
    want = "\n".join(IMAGE_PINS)
    if not (stamp.is_file() and stamp.read_text() == want):
        print(f"installing {len(IMAGE_PINS)} pinned packages (no dependencies) into {IMAGE_PACKAGES} ...",
              file=sys.stderr)
        _pip_install(IMAGE_PACKAGES, IMAGE_PINS, WHEEL_TAGS)
        stamp.write_text(want)
    return IMAGE_PACKAGES


def ensure_pack_packages() -> Path:
    stamp = PACK_PACKAGES / ".pins"
    want = "\n".join(sorted(PACK_PINS.values()))
    if not (stamp.is_file() and stamp.read_text() == want):
        _pip_install(PACK_PACKAGES, sorted(PACK_PINS.values()))
        stamp.write_text(want)
    return PACK_PACKAGES


def ensure_debian(pkg: str) -> tuple[Path, str]:
    """Download and unpack Debian package ``pkg`` (pinned version, else the newest); (folder, version)."""
    DEBIAN.mkdir(parents=True, exist_ok=True)
    done = sorted(DEBIAN.glob(f"{pkg}_*/.unpacked"))
    if done:
        folder = done[-1].parent
        return folder, folder.name.split("_", 1)[1]
    debs = DEBIAN / "debs"
    debs.mkdir(exist_ok=True)
    for spec in (f"{pkg}={DEBIAN_PINS[pkg]}", pkg, "update", f"{pkg}={DEBIAN_PINS[pkg]}", pkg):
        if spec == "update":
            subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            continue
        if subprocess.run(["apt-get", "download", "-q", spec], cwd=debs, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0:
            break
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if not found:
        raise SystemExit(f"Debian package {pkg} could not be downloaded: run `apt-get update` and try again")
    deb = found[-1]
    version = deb.name.split("_")[1].replace("%3a", ":")
    folder = DEBIAN / f"{pkg}_{version}"
    if folder.exists():
        shutil.rmtree(folder)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(folder)], check=True)
    (folder / ".unpacked").write_text(version)
    return folder, version


def _prepare_data():
    """prepare_data.py (beside this file) as a module: its held-out rule and its domain roots."""
    spec = importlib.util.spec_from_file_location("smollm2_prepare_data", HERE / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def heldout_files(pd) -> dict[str, list[Path]]:
    """Every file that prepare_data.py may hold out, by domain: the same roots, filters and hash of (seed,
    relative path), without its byte budgets (a superset of what it writes to ``heldout/``)."""
    out: dict[str, list[Path]] = {}
    for domain, (root, patterns, _budget) in pd._domains().items():
        files = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
        keep = []
        for path in files:
            rel = path.relative_to(root).as_posix()
            size = path.stat().st_size
            if size == 0 or size > MAX_FILE or ("/test" in f"/{rel}" and domain == "python"):
                continue
            if pd.held_out(rel, SEED, HELDOUT_FRACTION):
                keep.append(path)
        out[domain] = keep
    return out


# ------------------------------------------------------------------------------------------------ the pack

@dataclass
class Source:
    """One source of the pack: documents ``(relative name, text)`` in a fixed order, all in one domain."""

    name: str
    domain: str
    part: int  # 1 or 2
    docs: Callable[[], Iterator[tuple[str, str | None]]]  # text None: skipped by the source ("untranslated")
    license: str
    origin: str
    cap_mb: float | None = None  # MB of text to take at most (a part also ends its sources when it is full)
    stats: dict = field(default_factory=dict)


def _files(root: Path, patterns: Iterable[str]) -> list[Path]:
    return sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()},
                  key=lambda p: p.relative_to(root).as_posix())


def file_docs(root: Path, patterns: Iterable[str], skip: Callable[[str], bool] = lambda rel: False,
              order: str = "path") -> Callable[[], Iterator[tuple[str, str]]]:
    """Documents = the text files under ``root`` (``.gz`` ones decompressed), in path order or in a fixed
    shuffled order (``order="hash"``: a byte cap then samples the whole source)."""

    def gen() -> Iterator[tuple[str, str]]:
        files = _files(root, patterns)
        if order == "hash":
            files.sort(key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).digest())
        for path in files:
            rel = path.relative_to(root).as_posix()
            if skip(rel):
                continue
            data = path.read_bytes()
            if rel.endswith(".gz"):
                data = gzip.decompress(data)
                rel = rel[:-3]
            if len(data) > MAX_FILE:
                continue
            text = decode(data)
            if text is not None:
                yield rel, text
    return gen


def _chat_docs(yml_root: Path, skip: Callable[[str], bool], pd) -> Callable[[], Iterator[tuple[str, str]]]:
    def gen() -> Iterator[tuple[str, str]]:
        for path in _files(yml_root, ["**/*.yml"]):
            rel = path.relative_to(yml_root).as_posix()
            if skip(rel):
                continue
            lines = pd._chat_lines(path)
            if lines:
                yield rel[:-4] + ".jsonl", "\n".join(lines) + "\n"
    return gen


def _html_docs(root: Path, patterns: Iterable[str], root_class: str | None = None,
               skip: Callable[[str], bool] = lambda rel: False) -> Callable[[], Iterator[tuple[str, str]]]:
    """Documents = the readable text of HTML pages (``.txt`` names)."""
    def gen() -> Iterator[tuple[str, str]]:
        for path in _files(root, patterns):
            rel = path.relative_to(root).as_posix()
            if skip(rel) or path.name.startswith(("ix01.", "index.", "genindex", "search.", "py-modindex")):
                continue  # indexes and tables of contents: lists of links
            text = html_text(path.read_text(encoding="utf-8", errors="replace"), root_class)
            rel = rel[:-5] + ".txt"
            for i, piece in enumerate(split_text(text)):
                yield (rel if i == 0 else f"{rel[:-4]}.{i}.txt"), piece
    return gen


def _translations(root: Path, source_lang: str = "en-US") -> Callable[[], Iterator[tuple[str, str | None]]]:
    """The debian-handbook's pages in the other languages; a page that is mostly still in English (half of its
    non-trivial lines are lines of the same English page) comes as ``(name, None)``: untranslated."""
    def gen() -> Iterator[tuple[str, str | None]]:
        english: dict[str, set[str]] = {}
        for rel, text in _html_docs(root, [f"{source_lang}/*.html"])():
            english.setdefault(rel.split("/", 1)[1], set()).update(nontrivial_lines(text))
        for rel, text in _html_docs(root, ["*/*.html"], skip=lambda r: r.startswith(source_lang + "/"))():
            lines = nontrivial_lines(text)
            same = english.get(rel.split("/", 1)[1], set())
            yield rel, (None if lines and sum(line in same for line in lines) >= 0.5 * len(lines) else text)
    return gen


_ROFF_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\s[-+]?\d"), ""),
                 (re.compile(r"\\\*?\(em"), "\u2014"), (re.compile(r"\\\*?\(en"), "\u2013"),
                 (re.compile(r"\\\*?\((lq|rq|dq)"), '"'),
                 (re.compile(r"\\\*?\(aq"), "'"), (re.compile(r"\\\*?\(bu"), "\u2022"),
                 (re.compile(r"\\\*?\[[^\]]*\]|\\\*?\(..|\\\*."), ""), (re.compile(r"\\[-]"), "-"),
                 (re.compile(r"\\[&c%,/:)]"), ""), (re.compile(r"\\[ ~0|^]"), " "),
                 (re.compile(r"\\e"), lambda m: "\\")]
_ROFF_BREAK = {"SH", "SS", "PP", "LP", "P", "TP", "IP", "HP", "sp", "TS", "TE", "EX", "EE"}
_ROFF_FONT = {"B", "I", "SM", "SB"}
_ROFF_ALT = {"BI", "IB", "RB", "BR", "IR", "RI"}


def roff_text(src: str) -> str:
    """The readable text of a man page's roff source (a small subset of man(7): headings, paragraphs, fonts)."""
    out: list[str] = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"")) or line in (".", "'"):  # comments, empty requests
            continue
        if line.startswith((".", "'")):
            req, _, arg = line[1:].strip().partition(" ")
            args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', arg)]
            if req in ("SH", "SS"):
                out += ["", " ".join(args).upper() if req == "SH" else " ".join(args)]
            elif req in _ROFF_BREAK:
                out.append("")
                if req == "IP" and args:
                    out.append(args[0])
            elif req in _ROFF_FONT:
                out.append(" ".join(args))
            elif req in _ROFF_ALT:
                out.append("".join(args))
            elif req in ("UR", "MT"):
                out.append(arg)
            continue  # every other request: layout, definitions, conditionals
        out.append(line)
    text = "\n".join(out)
    for pattern, repl in _ROFF_ESCAPES:
        text = pattern.sub(repl, text)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _man_docs(pkgs: list[tuple[str, Path]]) -> Callable[[], Iterator[tuple[str, str]]]:
    """Documents = translated man pages as text, in a fixed shuffled order over all the languages."""
    def gen() -> Iterator[tuple[str, str]]:
        pages = [(f"{lang}/{p.relative_to(root).as_posix()[:-3]}.txt", p) for lang, root in pkgs
                 for p in sorted(root.glob("man*/*.gz"))]
        pages.sort(key=lambda item: hashlib.sha256(item[0].encode()).digest())
        for rel, path in pages:
            text = decode(gzip.decompress(path.read_bytes()))
            if text and not text.lstrip().startswith(".so "):  # ".so": an alias of another page
                yield rel, roff_text(text)
    return gen


def _text_docs(items: list[tuple[str, Path]]) -> Callable[[], Iterator[tuple[str, str]]]:
    """Documents = long text files (``.gz`` ones decompressed) cut into pieces, named ``<name>.<k>.txt``."""
    def gen() -> Iterator[tuple[str, str]]:
        for name, path in items:
            data = path.read_bytes()
            text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8", errors="replace")
            for i, piece in enumerate(split_text(text)):
                yield f"{name}.{i:02d}.txt", piece
    return gen


def pack_sources(pd) -> list[Source]:
    """What the pack holds, by priority: each part's sources in order until the part is full."""
    held = lambda rel: pd.held_out(rel, SEED, HELDOUT_FRACTION)  # noqa: E731
    botocore, django, chatter = (pd._package_dir(n) for n in ("botocore", "django", "chatterbot_corpus"))
    site = ensure_pack_packages()
    lic, corp = tree_licenses(site), tree_licenses(pd.CORPORA)
    deb = {p: ensure_debian(p) for p in DEBIAN_PINS}
    doc_ver = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "python3.11-doc"], capture_output=True,
                             text=True).stdout or "?"

    def pypi(top: str, table: dict = lic) -> dict:
        dist, license = table.get(top, ("?", "unknown"))
        return {"license": license, "origin": f"PyPI {dist}"}

    def debian(*pkgs: str, license: str | None = None) -> dict:
        lics = sorted({debian_license(deb[p][0] / "usr/share/doc" / p / "copyright") for p in pkgs})
        return {"license": license or " / ".join(lics),
                "origin": "Debian " + ", ".join(f"{p} {deb[p][1]}" for p in pkgs)}

    def folder(pkg: str, sub: str) -> Path:
        return deb[pkg][0] / sub

    boto = botocore / "data"
    linux = folder("linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html/_sources")
    handbook = folder("debian-handbook", "usr/share/doc/debian-handbook/html")
    refs = [f"debian-reference-{lang}" for lang in REFERENCE_LANGS if lang != "en"]
    devrefs = [f"developers-reference-{lang}" for lang in DEVREF_LANGS]
    maints = [f"maint-guide-{lang}" for lang in MAINT_LANGS]

    def ref_items(pkgs: list[str]) -> list[tuple[str, Path]]:
        return [(f"{p.rsplit('-', 1)[-1] if 'reference-' in p else p}/{f.name.split('.txt')[0]}", f)
                for p in pkgs for f in sorted(folder(p, "usr/share/debian-reference").glob("*.txt.gz"))]

    def maint_items(pkgs: list[str]) -> list[tuple[str, Path]]:
        return [(f"{p}/{f.name.split('.txt')[0]}", f) for p in pkgs
                for f in sorted(folder(p, f"usr/share/doc/{p}").glob("maint-guide*.txt.gz"))]

    def devref(pkgs: list[str]) -> Callable[[], Iterator[tuple[str, str]]]:
        def gen() -> Iterator[tuple[str, str]]:
            for p in pkgs:
                lang = p.rsplit("-", 1)[-1] if p != "developers-reference" else "en"
                root = folder(p, f"usr/share/developers-reference/{lang}/_sources")
                if not root.is_dir():
                    root = next(iter(sorted(folder(p, "usr/share").glob("**/_sources"))), root)
                for rel, text in file_docs(root, ["**/*.rst.txt"])():
                    yield f"{lang}/{rel}", text
        return gen

    only_en = lambda rel: not rel.startswith("en-US/")  # noqa: E731
    S = Source
    return [
        # part 1: the held-out evaluation domains (docs, json, po, yaml) and chat, then English prose
        S("python3.11-doc", "docs", 1, file_docs(pd.DOCS, ["**/*.rst.txt"], held),
          "PSF-2.0 (the Python documentation licence)", f"Debian python3.11-doc {doc_ver}"),
        S("botocore", "json", 1, file_docs(boto, ["**/*.json"], held), **pypi("botocore", corp)),
        S("django", "po", 1, file_docs(django, ["**/locale/*/LC_MESSAGES/*.po"], held), **pypi("django", corp)),
        S("sphinx", "po", 1, file_docs(site / "sphinx", ["locale/*/LC_MESSAGES/*.po"]), **pypi("sphinx")),
        S("wagtail", "po", 1, file_docs(site / "wagtail", ["**/locale/*/LC_MESSAGES/*.po"]), **pypi("wagtail")),
        S("django-allauth", "po", 1, file_docs(site / "allauth", ["**/locale/*/LC_MESSAGES/*.po"]),
          **pypi("allauth")),
        S("chatterbot-corpus", "yaml", 1, file_docs(chatter / "data", ["**/*.yml"], held),
          **pypi("chatterbot_corpus", corp)),
        S("chatterbot-corpus", "chat", 1, _chat_docs(chatter / "data", held, pd), **pypi("chatterbot_corpus", corp)),
        S("ruby-faker", "yaml", 1, file_docs(deb["ruby-faker"][0], ["**/locales/**/*.yml"]), **debian("ruby-faker")),
        S("botocore-models", "json", 1, file_docs(boto, ["**/*.json.gz"], order="hash"), **pypi("botocore", corp)),
        S("cmake-doc", "docs", 1, file_docs(folder("cmake-doc", "usr/share/doc/cmake-data/html/_sources"),
                                            ["**/*.rst.txt"]), **debian("cmake-doc", license="BSD-3-Clause")),
        S("debian-reference", "docs", 1, _text_docs(ref_items(["debian-reference-en"])),
          **debian("debian-reference-en")),
        S("linux-doc", "docs", 1, file_docs(linux, ["**/*.rst.txt"], order="hash"), **debian("linux-doc-6.1")),
        # part 2: prose in other languages first, then more English prose and catalogues
        S("debian-reference", "intl", 2, _text_docs(ref_items(refs)), **debian(*refs)),
        S("debian-handbook", "intl", 2, _translations(handbook), **debian("debian-handbook")),
        S("developers-reference", "intl", 2, devref(devrefs), **debian(*devrefs)),
        S("maint-guide", "intl", 2, _text_docs(maint_items(maints)), **debian(*maints)),
        S("manpages-l10n", "intl", 2, _man_docs([(lang, folder(f"manpages-{lang}", f"usr/share/man/{lang.split('-')[0]}"
                                                                if lang != "pt-br" else "usr/share/man/pt_BR"))
                                                 for lang in MAN_LANGS]),
          **debian(*[f"manpages-{lang}" for lang in MAN_LANGS]), cap_mb=12),
        S("debian-handbook", "docs", 2, _html_docs(handbook, ["*/*.html"], skip=only_en), **debian("debian-handbook")),
        S("developers-reference", "docs", 2, devref(["developers-reference"]), **debian("developers-reference")),
        S("maint-guide", "docs", 2, _text_docs(maint_items(["maint-guide"])), **debian("maint-guide")),
        S("django-doc", "docs", 2, _html_docs(folder("python-django-doc", "usr/share/doc/python-django-doc/html"),
                                              ["**/*.html"], "yui-g", skip=lambda rel: rel.startswith("_")),
          **debian("python-django-doc")),
        S("postgresql-doc", "docs", 2, _html_docs(folder("postgresql-doc-15", "usr/share/doc/postgresql-doc-15/html"),
                                                  ["*.html"]), **debian("postgresql-doc-15", license="PostgreSQL")),
        S("nodejs-doc", "docs", 2, file_docs(folder("nodejs-doc", "usr/share/doc/nodejs/api"), ["*.md.gz"]),
          **debian("nodejs-doc", license="Expat")),
        S("git-doc", "docs", 2, file_docs(folder("git-doc", "usr/share/doc/git-doc"), ["*.txt"]), **debian("git-doc")),
        S("plone-app-locales", "po", 2, file_docs(site / "plone", ["**/*.po"], order="hash"), **pypi("plone"),
          cap_mb=16),
        S("linux-doc", "docs", 2, file_docs(linux, ["**/*.rst.txt"], order="hash"), **debian("linux-doc-6.1")),
        S("botocore-models", "json", 2, file_docs(boto, ["**/*.json.gz"], order="hash"), **pypi("botocore", corp)),
    ]


class _Counted(io.RawIOBase):
    """A write-only stream into an xz compressor that counts the compressed bytes written so far."""

    def __init__(self, f, preset: int) -> None:
        self.f = f
        self.comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=preset)
        self.out = 0
        self.raw = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = self.comp.compress(bytes(b))
        self.f.write(data)
        self.out += len(data)
        self.raw += len(b)
        return len(b)

    def finish(self) -> None:
        data = self.comp.flush()
        self.f.write(data)
        self.out += len(data)


def _write_part(path: Path, sources: list[Source], limit: int, heldout: frozenset[int], seen: set[int],
                margin: int, preset: int) -> tuple[int, int, set[int]]:
    """Write one part; returns (compressed bytes, raw bytes, content hashes packed)."""
    added: set[int] = set()
    with open(path, "wb") as f:
        stream = _Counted(f, preset)
        tar = tarfile.open(fileobj=stream, mode="w|", format=tarfile.GNU_FORMAT, encoding="utf-8")  # noqa: SIM115
        for s in sources:
            st = s.stats = {"documents": 0, "bytes": 0, "skipped": Counter(), "complete": True}
            cap = None if s.cap_mb is None else int(s.cap_mb * (1 << 20))
            for rel, text in s.docs():
                if cap is not None and st["bytes"] >= cap or stream.out + margin >= limit:
                    st["complete"] = False
                    break
                if text is None:  # the source's own judgement (a page left untranslated)
                    st["skipped"]["untranslated"] += 1
                    continue
                if s.domain == "chat":
                    rows = [r for r in text.splitlines()
                            if r.strip() and text_key(r) not in seen and text_key(r) not in added]
                    reason = None if rows else "duplicate"
                    text = "\n".join(rows) + "\n"
                    if not reason:
                        added.update(text_key(r) for r in rows)
                else:
                    key = text_key(text)
                    reason = "duplicate" if key in seen or key in added else "huge" if len(
                        text.encode("utf-8")) > MAX_FILE else check(text, s.domain, heldout, po=rel.endswith(".po"))
                    if not reason:
                        added.add(key)
                if reason:
                    st["skipped"][reason] += 1
                    continue
                data = text.encode("utf-8")
                info = tarfile.TarInfo(f"{s.domain}/{s.name}/{rel}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
                tar.addfile(info, io.BytesIO(data))
                st["documents"] += 1
                st["bytes"] += len(data)
            st["skipped"] = dict(sorted(st["skipped"].items()))
            print(f"  {path.name}: {s.domain:5s} {s.name:20s} {st['documents']:6d} docs "
                  f"{st['bytes'] / 1e6:7.2f} MB   xz so far {stream.out / 1e6:6.2f} MB", file=sys.stderr)
        tar.close()
        stream.finish()
    return stream.out, stream.raw, added


def write_pack(out: Path, sources: list[Source], heldout: frozenset[int], max_mb: float = 24, parts: int = 2,
               preset: int = 9, extra_manifest: dict | None = None) -> dict:
    """Write ``out/part-K.tar.xz`` (each at most ``max_mb / parts`` MB), ``heldout-lines.bin`` and
    ``manifest.json``. Deterministic: the same sources give the same bytes."""
    if parts not in (1, 2):
        raise SystemExit("--parts must be 1 or 2")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.tar.xz"):
        old.unlink()
    limit = int(max_mb * 1e6 / parts)
    save_heldout(out / "heldout-lines.bin", heldout)
    seen: set[int] = set()
    manifest = {"parts": {}, "limit_bytes_per_part": limit, "heldout_lines": len(heldout),
                "rules": {"seed": SEED, "heldout_fraction": HELDOUT_FRACTION, "min_line": MIN_LINE,
                          "overlap": OVERLAP, "max_file": MAX_FILE}, **(extra_manifest or {})}
    for k in range(1, parts + 1):
        srcs = [s for s in sources if (s.part if parts == 2 else 1) == k]
        path = out / f"part-{k}.tar.xz"
        margin = 256 << 10
        while True:
            size, raw, added = _write_part(path, srcs, limit, heldout, seen, margin, preset)
            if size <= limit:
                break
            margin += max(512 << 10, size - limit + (256 << 10))  # rare: the compressor had more in flight
            print(f"  {path.name} is {size / 1e6:.2f} MB > {limit / 1e6:.2f}: again, ending earlier", file=sys.stderr)
        seen |= added
        manifest["parts"][path.name] = {
            "bytes": size, "raw_bytes": raw, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "sources": [{"name": s.name, "domain": s.domain, "license": s.license, "origin": s.origin,
                         **s.stats} for s in srcs]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def cmd_pack(args) -> None:
    t0 = time.time()
    pd = _prepare_data()
    files = heldout_files(pd)
    keys: set[int] = set()
    counts = {}
    for domain, paths in files.items():
        n0 = len(keys)
        for p in paths:
            text = decode(p.read_bytes())
            if text:
                keys.update(line_key(line) for line in nontrivial_lines(text))
        counts[domain] = {"files": len(paths), "new_line_hashes": len(keys) - n0}
    print(f"held-out set: {len(keys)} line hashes from {sum(map(len, files.values()))} files", file=sys.stderr)
    sources = pack_sources(pd)
    manifest = write_pack(args.out, sources, frozenset(keys), args.max_mb, args.parts,
                          extra_manifest={"heldout_files": counts})
    for name, p in manifest["parts"].items():
        print(f"{name}: {p['bytes'] / 1e6:.2f} MB xz, {p['raw_bytes'] / 1e6:.1f} MB tar", file=sys.stderr)
    print(f"pack written to {args.out} in {time.time() - t0:.0f} s", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ the build

ORIGINS = ("tree", "part-1", "part-2")


def tree_roots(source: str) -> list[tuple[Path, set[str] | None]]:
    """(site-packages folder, top-level names to read or ``None`` for all) for ``--source``."""
    if source == "image":
        stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
        roots = []
        for key in ("purelib", "platlib"):
            p = Path(sysconfig.get_paths()[key]).resolve()
            if p.is_dir() and p not in [r for r, _ in roots] and p != stdlib:
                roots.append((p, None))
        return roots
    spec = importlib.util.find_spec("torch")
    roots = [(ensure_image_packages().resolve(), None)]
    if spec and spec.origin:
        site = Path(spec.origin).resolve().parents[1]
        roots.append((site, {*TORCH_TOPS, *(p.name for p in site.glob("torch-*.dist-info"))}))
    return roots


def list_tree(roots: list[tuple[Path, set[str] | None]],
              exclude: Iterable[str] = ()) -> list[tuple[str, str, str, str]]:
    """(domain, relative name, absolute path, top-level name) of every candidate file, sorted, each relative
    name once (the first root wins); top-level names in ``exclude`` are left out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    found: dict[str, tuple[str, str, str, str]] = {}
    skip = _SKIP_TOPS | set(exclude)
    for root, tops in roots:
        for top in sorted(os.listdir(root)):
            if tops is not None and top not in tops or top in skip or top.startswith(("__editable__", ".")):
                continue
            base = root / top
            if base.resolve() == stdlib or stdlib in base.resolve().parents:
                continue
            if base.is_file():
                walk = [(str(root), [], [top])]
            else:
                walk = os.walk(base)
            for dirpath, dirnames, filenames in walk:
                dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
                for name in sorted(filenames):
                    full = os.path.join(dirpath, name)
                    rel = os.path.relpath(full, root).replace(os.sep, "/")
                    d = domain_of(rel)
                    if d is None or rel in found:
                        continue
                    found[rel] = (d, rel, full, top)
    return sorted(found.values())


def list_pack(folder: Path) -> list[tuple[str, str, str, str]]:
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = path.relative_to(folder).as_posix()
            if rel.count("/") < 2:
                continue  # the unpack stamp
            domain, source = rel.split("/", 2)[:2]
            if domain in DOMAINS:
                out.append((domain, rel, str(path), source))
    return out


_HELD: frozenset[int] = frozenset()  # the held-out line hashes, set before the workers fork


def _read_doc(path: str, domain: str) -> tuple[str, list[str] | None]:
    """(text or "", chat rows or None) of a file, ``""`` when it is not usable text."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return "", None
    text = decode(data) or ""
    if domain == "chat":
        return text, [r for r in text.splitlines() if r.strip()]
    return text, None


def _scan(items: list[tuple[int, str, str]]) -> list[tuple[int, int | None, str | None, int, int]]:
    """Phase 1 (a worker): (index, chat row or None, reason or None, content hash, bytes) for each
    (index, domain, path); a chat file gives one result per transcript (line)."""
    out = []
    for i, domain, path in items:
        if domain != "chat" and os.path.getsize(path) > MAX_FILE:
            out.append((i, None, "huge", 0, 0))
            continue
        if os.path.getsize(path) == 0:
            out.append((i, None, "tiny", 0, 0))
            continue
        text, rows = _read_doc(path, domain)
        if domain == "chat":
            out.extend((i, j, None, text_key(r), len(r.encode("utf-8"))) for j, r in enumerate(rows or []))
            continue
        if not text:
            out.append((i, None, "binary", 0, 0))  # NUL bytes, or not UTF-8
            continue
        reason = check(text, domain, _HELD, po=path.endswith(".po"))
        out.append((i, None, reason, text_key(text) if reason is None else 0, len(text.encode("utf-8"))))
    return out


def _write_shard(job: tuple[str, str, list[tuple[str, str, str, list[int] | None]]]) -> tuple[str, int]:
    """Phase 2 (a worker): write one JSONL shard of (relative name, path, top-level name, chat rows)."""
    out, domain, docs = job
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for rel, path, top, rows in docs:
            text, all_rows = _read_doc(path, domain)
            if domain == "chat":
                for j in rows:
                    f.write(all_rows[j].rstrip("\n") + "\n")
                    n += 1
            else:
                f.write(json.dumps({"text": text, "source": top, "path": rel}, ensure_ascii=False) + "\n")
                n += 1
    return out, n


def _tokens(job: tuple[str | None, str, list[str]]) -> tuple[int, int]:
    """(bytes, tokens) of a sample of texts with the SmolLM2 tokenizer (a worker)."""
    tok_dir, domain, texts = job
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    b = sum(len(t.encode("utf-8")) for t in texts)
    n = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    return b, n


# bytes per token when no tokenizer is at hand (measured with SmolLM2's on this corpus, `build --source local`)
FALLBACK_BPT = {"python": 3.66, "cpp": 2.87, "code": 3.23, "docs": 3.50, "intl": 2.73, "json": 4.74, "yaml": 2.54,
                "csv": 1.03, "po": 2.27, "chat": 2.01}


def tokenizer_dir(given: str | None, convert: bool = True) -> str | None:
    """The SmolLM2 tokenizer folder: ``given``, else .cache's, else (``convert``) made by scripts/assets.py."""
    if given == "none":
        return None
    if given:
        return given
    local = ROOT / ".cache" / "smollm2-135m-instruct-tokenizer"
    if (local / "tokenizer.json").is_file():
        return str(local)
    if not convert:
        return None
    try:
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "assets.py")], capture_output=True, text=True,
                           timeout=600)
        lines = r.stdout.strip().splitlines()
        if r.returncode == 0 and lines and Path(lines[-1]).is_dir():
            return lines[-1]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _order_key(rel: str) -> bytes:
    return hashlib.sha256(rel.encode("utf-8")).digest()


def build_origin(out: Path, origin: str, items: list[tuple[str, str, str, str]], licenses: dict[str, str],
                 pool, workers: int, budget: int | None, earlier: set[int], tok_dir: str | None) -> dict:
    """Scan, deduplicate, budget and write one origin's documents; returns its statistics."""
    t0 = time.time()
    chunk = max(1, min(500, len(items) // (workers * 8) + 1))
    jobs = [[(i, items[i][0], items[i][2]) for i in range(s, min(s + chunk, len(items)))]
            for s in range(0, len(items), chunk)]
    results = [r for part in pool.imap(_scan, jobs) for r in part]
    seen: set[int] = set(earlier)
    skipped: dict[str, Counter] = defaultdict(Counter)
    kept: dict[str, list[tuple[bytes, int, int | None, int, int]]] = defaultdict(list)  # domain -> docs
    files_per_domain: Counter = Counter()
    for domain, *_ in items:
        files_per_domain[domain] += 1
    for i, row, reason, key, nbytes in results:  # in the sorted order of the items: the first copy wins
        domain = items[i][0]
        if reason is None and key in seen:
            reason = "duplicate"
        if reason:
            skipped[domain][reason] += 1
            continue
        seen.add(key)
        kept[domain].append((_order_key(items[i][1] + ("" if row is None else f"#{row}")), i, row, nbytes, key))
    stats: dict = {"origin": origin, "domains": {}, "hashes": []}
    shard_jobs, sample_jobs = [], []
    for domain in sorted(kept):
        docs = sorted(kept[domain])
        if budget is not None:
            total, cut = 0, len(docs)
            for n, d in enumerate(docs):
                if total >= budget:
                    cut = n
                    break
                total += d[3]
            docs = docs[:cut]
        folder = out / domain
        folder.mkdir(parents=True, exist_ok=True)
        shards, cur, size = [], [], 0
        for d in docs:
            if cur and size + d[3] > SHARD:
                shards.append(cur)
                cur, size = [], 0
            cur.append(d)
            size += d[3]
        if cur:
            shards.append(cur)
        for k, shard in enumerate(shards):
            rows: dict[int, list[int]] = {}
            order: list[int] = []
            for _, i, row, _, _ in shard:
                if i not in rows:
                    rows[i] = []
                    order.append(i)
                if row is not None:
                    rows[i].append(row)
            shard_jobs.append((str(folder / f"{origin}-{k:03d}.jsonl"), domain,
                               [(items[i][1], items[i][2], items[i][3], rows[i] if domain == "chat" else None)
                                for i in order]))
        # a fixed sample for the token estimate: the first documents of the shuffled order
        sample, sb = [], 0
        for _, i, row, _nbytes, _ in docs:
            if sb >= SAMPLE:
                break
            text, all_rows = _read_doc(items[i][2], domain)
            if domain == "chat":
                msgs = json.loads(all_rows[row])["messages"]
                text = "\n".join(m["content"] for m in msgs)
            sample.append(text[:32768])
            sb += len(sample[-1].encode())
        if sample and tok_dir:
            sample_jobs.append((tok_dir, domain, sample))
        sources: dict[str, dict] = {}
        for _, i, _, nbytes, _ in docs:
            top = items[i][3]
            s = sources.setdefault(top, {"bytes": 0, "documents": 0, "license": licenses.get(top, "unknown")})
            s["bytes"] += nbytes
            s["documents"] += 1
        stats["domains"][domain] = {
            "files": files_per_domain[domain], "documents": len(docs), "bytes": sum(d[3] for d in docs),
            "skipped": dict(sorted(skipped[domain].items())), "sources": dict(sorted(sources.items())),
            "sample_bytes": sb, "sample_tokens": None}
        stats["hashes"].extend(d[4] for d in docs)
    for domain in skipped:
        if domain not in stats["domains"]:
            stats["domains"][domain] = {"files": files_per_domain[domain], "documents": 0, "bytes": 0,
                                        "skipped": dict(sorted(skipped[domain].items())), "sources": {},
                                        "sample_bytes": 0, "sample_tokens": None}
    shard_jobs.sort(key=lambda j: -sum(os.path.getsize(p) for _, p, _, _ in j[2][:50]))  # big first
    list(pool.imap_unordered(_write_shard, shard_jobs))
    for (_, domain, _), (b, n) in zip(sample_jobs, pool.map(_tokens, sample_jobs)):
        stats["domains"][domain]["sample_bytes"], stats["domains"][domain]["sample_tokens"] = b, n
    print(f"  {origin}: {len(items)} files -> {sum(d['documents'] for d in stats['domains'].values())} documents, "
          f"{sum(d['bytes'] for d in stats['domains'].values()) / 1e6:.1f} MB in {time.time() - t0:.0f} s",
          file=sys.stderr)
    return stats


def _unpack(pack: Path, name: str, dest: Path) -> Path | None:
    """Unpack ``pack/name`` (a part) into ``dest``; ``None`` if the part is not there."""
    src = pack / f"{name}.tar.xz"
    if not src.is_file():
        return None
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    folder = dest / name
    stamp = folder / ".sha256"
    if stamp.is_file() and stamp.read_text() == digest:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with tarfile.open(src, "r:xz") as tar:
        for m in tar.getmembers():
            if not m.isfile() or m.name.startswith("/") or ".." in m.name.split("/"):
                raise SystemExit(f"{src}: unexpected member {m.name!r}")
        tar.extractall(folder)
    stamp.write_text(digest)
    return folder


def build(out: Path, pack: Path | None = None, source: str | None = "local", budget_mb: float | None = None,
          workers: int | None = None, tokenizer: str | None = None, heldout: Path | None = None,
          roots: list[tuple[Path, set[str] | None]] | None = None, force: bool = False,
          exclude: Iterable[str] = ()) -> dict:
    """Write (or complete) the corpus in ``out``; returns the summary. ``roots`` overrides ``source``'s trees;
    ``source=None`` with no ``roots`` builds from the pack alone."""
    global _HELD
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    state = out / ".state"
    state.mkdir(exist_ok=True)
    budget = None if budget_mb is None else int(budget_mb * (1 << 20))
    held_path = heldout or (pack / "heldout-lines.bin" if pack else None)
    if held_path is None or not held_path.is_file():
        raise SystemExit("the held-out line hashes are needed: give --pack DIR (with heldout-lines.bin) "
                         "or --heldout FILE; `pack` writes them")
    _HELD = load_heldout(held_path)
    exclude = sorted(set(exclude))
    config = {"budget": budget, "heldout": hashlib.sha256(held_path.read_bytes()).hexdigest(),
              "source": source if roots is None else [str(r) for r, _ in roots], "exclude": exclude}
    workers = workers or os.cpu_count() or 1
    tok_dir = tokenizer_dir(tokenizer, convert=source == "local")  # the GPU image has no registry to convert from
    if tok_dir is None and tokenizer != "none":
        print("note: no SmolLM2 tokenizer found: token counts use fixed bytes per token", file=sys.stderr)
    todo: list[tuple[str, Callable[[], tuple[list, dict]]]] = []
    if roots is not None or source is not None:
        def tree() -> tuple[list, dict]:
            rs = roots if roots is not None else tree_roots(source)
            lic: dict[str, str] = {}
            for r, _ in rs:
                for top, (dist, licence) in tree_licenses(r).items():
                    lic.setdefault(top, f"{licence} ({dist})")
            return list_tree(rs, exclude), lic
        todo.append(("tree", tree))
    if pack is not None:
        manifest = json.loads((pack / "manifest.json").read_text()) if (pack / "manifest.json").is_file() else {}
        for name in ORIGINS[1:]:
            if not (pack / f"{name}.tar.xz").is_file():
                print(f"note: {pack / (name + '.tar.xz')} is not there: skipped (run build again when it is)",
                      file=sys.stderr)
                continue
            lic = {s["name"]: f"{s['license']} ({s['origin']})"
                   for s in manifest.get("parts", {}).get(f"{name}.tar.xz", {}).get("sources", [])}

            def part(name=name, lic=lic) -> tuple[list, dict]:
                return list_pack(_unpack(pack, name, state / "pack")), lic
            todo.append((name, part))
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        for origin, get in todo:
            stamp = state / f"{origin}.json"
            if stamp.is_file() and not force:
                old = json.loads(stamp.read_text())
                key = {**config, "pack": _part_digest(pack, origin)}
                if old.get("config") == key:
                    print(f"  {origin}: already built", file=sys.stderr)
                    continue
            for old in out.glob(f"*/{origin}-*.jsonl"):
                old.unlink()
            earlier: set[int] = set()
            for prev in ORIGINS[:ORIGINS.index(origin)]:
                hp = state / f"{prev}.hashes"
                if hp.is_file():
                    earlier |= load_heldout(hp)
            items, lic = get()
            stats = build_origin(out, origin, items, lic, pool, workers, budget, earlier, tok_dir)
            save_heldout(state / f"{origin}.hashes", stats.pop("hashes"))
            stats["config"] = {**config, "pack": _part_digest(pack, origin)}
            stamp.write_text(json.dumps(stats, indent=1, ensure_ascii=False))
    summary = write_summary(out)
    print(f"corpus in {out}: {summary['total']['bytes'] / 1e6:.1f} MB, about "
          f"{summary['total']['tokens'] / 1e6:.1f}M tokens ({time.time() - t0:.0f} s)", file=sys.stderr)
    return summary


def _part_digest(pack: Path | None, origin: str) -> str | None:
    if origin == "tree" or pack is None:
        return None
    p = pack / f"{origin}.tar.xz"
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def write_summary(out: Path) -> dict:
    """``out/summary.json``: per domain (all origins built so far) files, documents, bytes, estimated tokens."""
    domains: dict[str, dict] = {}
    for origin in ORIGINS:
        stamp = out / ".state" / f"{origin}.json"
        if not stamp.is_file():
            continue
        for domain, d in json.loads(stamp.read_text())["domains"].items():
            s = domains.setdefault(domain, {"files": 0, "documents": 0, "bytes": 0, "sample_bytes": 0,
                                            "sample_tokens": 0, "skipped": Counter(), "origins": {},
                                            "sources": {}})
            for k in ("files", "documents", "bytes"):
                s[k] += d[k]
            bpt = (d["sample_bytes"] / d["sample_tokens"]) if d.get("sample_tokens") else FALLBACK_BPT[domain]
            s["origins"][origin] = {"documents": d["documents"], "bytes": d["bytes"],
                                    "tokens": round(d["bytes"] / bpt), "bytes_per_token": round(bpt, 3),
                                    "measured": bool(d.get("sample_tokens"))}
            s["skipped"].update(d["skipped"])
            for src, v in d["sources"].items():
                s["sources"][f"{origin}:{src}"] = v
    total = {"documents": 0, "bytes": 0, "tokens": 0}
    for s in domains.values():
        s["tokens"] = sum(o["tokens"] for o in s["origins"].values())
        s["bytes_per_token"] = round(s["bytes"] / s["tokens"], 3) if s["tokens"] else None
        s["skipped"] = dict(sorted(s["skipped"].items()))
        for k in total:
            total[k] += s[k]
        del s["sample_bytes"], s["sample_tokens"]
    summary = {"total": total, "domains": {d: domains[d] for d in DOMAINS if d in domains}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return summary


def cmd_build(args) -> None:
    if args.source == "image" and args.pack is None and args.heldout is None:
        raise SystemExit("--source image needs --pack DIR (or --heldout FILE) for the held-out line hashes")
    heldout = args.heldout
    if heldout is None and args.pack is None:
        heldout = args.out / ".state" / "heldout-lines.bin"  # local: made here, like `pack` does
        heldout.parent.mkdir(parents=True, exist_ok=True)
        pd = _prepare_data()
        keys = {line_key(line) for paths in heldout_files(pd).values() for p in paths
                for line in nontrivial_lines(decode(p.read_bytes()) or "")}
        save_heldout(heldout, keys)
    source = None if args.source == "none" else args.source
    build(args.out, args.pack, source, args.max_mb_per_domain, args.workers, args.tokenizer, heldout,
          force=args.force, exclude=args.exclude)


# ------------------------------------------------------------------------------------------------ yaml

# Share of training windows per domain before the repetition cap. Code is the bulk of the corpus but gets 42%
# (python 28, C/C++ 10, other code 4): the model must stay good at prose, data formats and languages too. The
# held-out evaluation domains (python, docs, json, po, yaml) get 70% together; chat keeps the instruct
# behaviour; csv and prose in other languages are small but distinct.
BASE_WEIGHTS = {"python": 0.28, "cpp": 0.10, "code": 0.04, "docs": 0.17, "intl": 0.07, "json": 0.09,
                "yaml": 0.06, "csv": 0.02, "po": 0.10, "chat": 0.07}
GLOBS = {"chat": ["**/*.jsonl"]}


def data_weights(summary: dict, train_tokens: float, max_epochs: float) -> dict[str, float]:
    """BASE_WEIGHTS over the domains present, each capped so that a run of ``train_tokens`` tokens reads no
    domain more than ``max_epochs`` times (what a cap frees goes to the others, in proportion)."""
    tokens = {d: s["tokens"] for d, s in summary["domains"].items() if s.get("tokens")}
    w = {d: BASE_WEIGHTS[d] for d in DOMAINS if d in tokens}
    capped: dict[str, float] = {}
    for _ in range(len(w)):
        free = {d: v for d, v in w.items() if d not in capped}
        rest = 1 - sum(capped.values())
        norm = sum(free.values())
        changed = False
        for d, v in free.items():
            share = v / norm * rest
            cap = max_epochs * tokens[d] / train_tokens
            if share > cap:
                capped[d] = cap
                changed = True
        if not changed:
            break
    free = {d: v for d, v in w.items() if d not in capped}
    rest, norm = 1 - sum(capped.values()), sum(free.values())
    out = {**capped, **{d: v / norm * rest for d, v in free.items()}}
    total = sum(out.values())  # below 1 only when every domain is capped: then repetition can't be helped
    return {d: round(out[d] / total, 4) for d in w}


def cmd_yaml(args) -> None:
    summary = json.loads((args.out / "summary.json").read_text())
    weights = data_weights(summary, args.train_tokens, args.max_epochs)
    print(f"# corpus: {args.out} ({summary['total']['tokens'] / 1e6:.0f}M estimated tokens); weights for a run of "
          f"{args.train_tokens / 1e6:.0f}M tokens, no domain read more than {args.max_epochs:g} times")
    print("data:")
    for d, w in weights.items():
        s = summary["domains"][d]
        kind = "chat" if d == "chat" else "jsonl"
        glob = json.dumps(GLOBS.get(d, ["**/*.jsonl"]))
        epochs = w * args.train_tokens / s["tokens"]
        print(f"  - {{path: {(args.out / d).as_posix()}, kind: {kind}, glob: {glob}, weight: {w}}}"
              f"  # {s['tokens'] / 1e6:.1f}M tokens, {epochs:.2f} epochs")


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="gather the carried domains into xz parts (CPU, registries needed)")
    p.add_argument("--out", type=Path, required=True, help="folder for part-K.tar.xz, heldout-lines.bin, manifest")
    p.add_argument("--max-mb", type=float, default=24, help="all parts together at most this many MB (1e6 bytes)")
    p.add_argument("--parts", type=int, default=2, choices=(1, 2), help="number of parts")
    p = sub.add_parser("build", help="write the corpus as JSONL shards, one folder per domain")
    p.add_argument("--out", type=Path, required=True, help="corpus folder")
    p.add_argument("--pack", type=Path, help="folder of the pack (missing parts are skipped)")
    p.add_argument("--source", choices=("image", "local", "none"), default="local",
                   help="package trees: this interpreter's site-packages (image), the pinned packages in "
                        ".cache/corpora plus this environment's torch (local), or none (the pack alone)")
    p.add_argument("--max-mb-per-domain", type=float, help="at most this many MB per domain and origin (toy runs)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--tokenizer", help="SmolLM2 tokenizer folder for the token estimate (default: .cache's; "
                                       "'none': fixed bytes per token)")
    p.add_argument("--heldout", type=Path, help="held-out line hashes (default: the pack's, or made here)")
    p.add_argument("--force", action="store_true", help="rebuild origins already built")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME",
                   help="leave out this top-level name of the package trees (repeatable), e.g. nvidia "
                        "(CUDA headers under NVIDIA's proprietary licence)")
    p = sub.add_parser("yaml", help="print the data: list of a train config reading the corpus")
    p.add_argument("--out", type=Path, required=True, help="corpus folder written by build")
    p.add_argument("--train-tokens", type=float, default=150e6, help="tokens the run will read")
    p.add_argument("--max-epochs", type=float, default=4, help="read no domain more often than this")
    args = parser.parse_args(argv)
    {"pack": cmd_pack, "build": cmd_build, "yaml": cmd_yaml}[args.cmd](args)


if __name__ == "__main__":
    main()
