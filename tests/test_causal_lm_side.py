"""The causal-LM side network: the backbone's output layer read apart, step 0 = the backbone, chunked loss,
and device generation through hooks that computes exactly what the server trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model

from lightning_mobillm.backbone import FrozenBackbone
from lightning_mobillm.generation import SideGeneration, contiguous_head_input
from lightning_mobillm.side.causal_lm import OutputLayer, ResidualLMHead, chunked_cross_entropy
from lightning_mobillm.side.parallel_adapters import ParallelAdapterTrunk
from lightning_mobillm.specs import BackboneConfig

pytestmark = pytest.mark.timeout(180)

LAYERS = [1, 3]  # the tiny models have 4 blocks; the last (3) is the residual's base


def _block_taps(model, input_ids):
    kept = {}
    blocks = model.model.layers
    handles = [blocks[layer].register_forward_hook(
        lambda _m, _a, o, j=j: kept.__setitem__(j, (o[0] if isinstance(o, tuple) else o).detach()))
        for j, layer in enumerate(LAYERS)]
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
    finally:
        for h in handles:
            h.remove()
    acts = torch.stack([kept[j] for j in range(len(LAYERS))], dim=2)
    return logits, acts.reshape(-1, len(LAYERS), acts.shape[-1])


def _side(d, seed=0, zero=True):
    torch.manual_seed(seed)
    trunk = ParallelAdapterTrunk(len(LAYERS), d, reduction=4)
    head = ResidualLMHead(trunk.out_features, d)
    if not zero:
        for p in [*trunk.parameters(), *head.parameters()]:
            torch.nn.init.normal_(p, std=0.2)
    return trunk.eval(), head.eval()


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_step_zero_reproduces_the_backbone_and_a_trained_side_matches_the_hooked_model(kind):
    model = build_tiny_model(kind).eval()
    ids = torch.randint(3, 64, (2, 9))
    logits, acts = _block_taps(model, ids)
    output = OutputLayer.from_model(model)
    trunk, head = _side(model.config.hidden_size)
    with torch.no_grad():
        server = output(head(trunk(acts), acts[:, -1]))
    torch.testing.assert_close(server, logits.reshape(-1, logits.shape[-1]), rtol=1e-5, atol=1e-5)
    trunk, head = _side(model.config.hidden_size, zero=False)
    with torch.no_grad():
        server = output(head(trunk(acts), acts[:, -1])).reshape(logits.shape)
        with SideGeneration(model, LAYERS, trunk, head):
            device = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits  # the hooks are gone
    assert (server - logits).abs().max() > 1e-2  # the side network changes the prediction
    torch.testing.assert_close(device, server, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, logits)


def test_generate_with_a_zero_side_network_is_the_backbone_and_kv_cache_decoding_matches():
    model = build_tiny_model("llama").eval()
    ids = torch.randint(3, 64, (2, 6))
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **kw)
    trunk, head = _side(model.config.hidden_size)
    with SideGeneration(model, LAYERS, trunk, head):
        assert torch.equal(model.generate(ids, **kw), plain)
    trunk, head = _side(model.config.hidden_size, zero=False)
    with SideGeneration(model, LAYERS, trunk, head):
        cached = model.generate(ids, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
        beams = model.generate(ids, num_beams=3, **kw)
    with SideGeneration(model, LAYERS, trunk, head, last_only=True):  # what generate_texts uses
        last_only = model.generate(ids, **kw)
        last_only_beams = model.generate(ids, num_beams=3, **kw)
    assert torch.equal(cached, uncached)  # decoding one position at a time with the KV cache: the same tokens
    assert torch.equal(last_only, cached) and torch.equal(last_only_beams, beams)  # only the last position is read
    assert not torch.equal(cached, plain) and beams.shape[0] == 2


def test_the_lm_head_gets_a_contiguous_input_and_the_same_tokens():
    """``generate`` hands the head a strided view of the last position (bf16 CPU ``linear`` is slow and takes
    memory on it); the hook copies it contiguous, the tokens are the same, and the hook goes away after."""
    model = build_tiny_model("llama").eval()
    ids = torch.randint(3, 64, (3, 7))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    seen = []
    spy = model.lm_head.register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous()))
    plain = model.generate(ids, **kw)
    assert False in seen  # the prefill's head input is a view: what the hook is for
    spy.remove()
    seen.clear()
    with contiguous_head_input(model):  # registered before the spy, so the spy sees what the head gets
        spy = model.lm_head.register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous()))
        hooked = model.generate(ids, **kw)
    spy.remove()
    assert seen and all(seen)
    assert torch.equal(hooked, plain)
    assert not model.lm_head._forward_pre_hooks


def test_the_residual_is_measured_in_units_of_the_last_taps_rms():
    """``scale="rms"``: scaling a token's last tap scales its residual by the same factor, so after the final
    RMS norm the side network's change does not shrink with the backbone's magnitudes; ``"none"`` adds
    ``W_o(s)`` as it is. Both start at exactly the last tap."""
    torch.manual_seed(0)
    states, base = torch.randn(5, 8), torch.randn(5, 12)
    rms, plain = ResidualLMHead(8, 12), ResidualLMHead(8, 12, scale="none")
    assert torch.equal(rms(states, base), base) and torch.equal(plain(states, base), base)  # step 0
    plain.load_state_dict(rms.state_dict())
    for p in rms.parameters():
        torch.nn.init.normal_(p, std=0.1)
    plain.load_state_dict(rms.state_dict())
    delta = plain(states, base) - base  # W_o(s)
    scale = torch.tensor([[1.0], [3.0], [0.5], [10.0], [2.0]])
    torch.testing.assert_close(plain(states, scale * base) - scale * base, delta)  # independent of the base
    torch.testing.assert_close(rms(states, scale * base) - scale * base, scale * (rms(states, base) - base))
    torch.testing.assert_close(rms(states, base) - base, delta * base.pow(2).mean(-1, keepdim=True).sqrt(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scale must be one of"):
        ResidualLMHead(8, 12, scale="layer")


def test_the_last_block_must_be_tapped():
    model = build_tiny_model("llama")
    trunk, head = _side(model.config.hidden_size)
    with pytest.raises(ValueError, match="the last block \\(3\\) must be tapped"):
        SideGeneration(model, [0, 1], trunk, head)


def test_output_layer_read_from_the_checkpoint_matches_the_device_digest(tiny_llama_dir):
    backbone = FrozenBackbone(BackboneConfig(source=str(tiny_llama_dir), dtype="float32", layers=LAYERS))
    digest = backbone.identity()["digest"]
    read = OutputLayer.from_pretrained(tiny_llama_dir, expect_digest=digest)
    mine = OutputLayer.from_model(backbone.model)
    assert read.digest() == mine.digest() == digest
    h = torch.randn(5, backbone.hidden_size)
    torch.testing.assert_close(read(h), mine(h))
    with pytest.raises(ValueError, match="do not match the digest the device declared"):
        OutputLayer.from_pretrained(tiny_llama_dir, expect_digest="0" * 64)
    with pytest.raises(ValueError, match="do not match the digest"):
        OutputLayer.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16, expect_digest=digest)


def test_chunked_cross_entropy_equals_the_whole_and_its_gradient():
    model = build_tiny_model("gemma3")
    output = OutputLayer.from_model(model)
    h = torch.randn(37, model.config.hidden_size, requires_grad=True)
    y = torch.randint(0, 64, (37,))
    whole = F.cross_entropy(output(h), y)
    (g_whole,) = torch.autograd.grad(whole, h)
    chunked = chunked_cross_entropy(h, y, output, chunk_tokens=8)
    (g_chunked,) = torch.autograd.grad(chunked, h)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(g_chunked, g_whole)
    assert not any(p.requires_grad for p in output.norm.parameters()) and not output.weight.requires_grad
    with pytest.raises(ValueError, match="37 tokens but labels 5"):
        chunked_cross_entropy(h, y[:5], output)


def test_the_module_keeps_the_output_layer_out_of_its_parameters_and_checkpoints():
    from lightning_mobillm.modules import CausalLMSideModule
    from lightning_mobillm.specs import TapSpec

    model = build_tiny_model("llama")
    module = CausalLMSideModule(reduction=4)
    module.build(TapSpec(layers=LAYERS, hidden_size=32, arch="llama", is_decoder=True))
    before = set(module.state_dict())
    output = OutputLayer.from_model(model)
    module.attach_output_layer(output)
    assert set(module.state_dict()) == before and all(k.startswith("side.") for k in before)
    assert {"side.head.out.weight", "side.head.out.bias"} <= before
    frozen = {t.data_ptr() for t in output.tensors()}
    assert not any(p.data_ptr() in frozen for p in module.parameters())  # nothing of it trains or is saved
    assert module.side.head.out.weight.abs().sum() == 0


@pytest.mark.parametrize("padding", ["left", "right"])
def test_select_answer_keeps_exactly_the_marked_tokens_in_order(tiny_llama_dir, padding):
    backbone = FrozenBackbone(BackboneConfig(source=str(tiny_llama_dir), dtype="float32", layers=LAYERS))
    lengths = [7, 4, 6]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for b, n in enumerate(lengths):
        cols = slice(0, n) if padding == "right" else slice(7 - n, 7)
        ids[b, cols] = torch.randint(3, 64, (n,))
        mask[b, cols] = 1
    positions = torch.zeros(3, 7, dtype=torch.bool)
    real = [mask[b].nonzero().flatten().tolist() for b in range(3)]
    keep = [real[0][2:5], real[1][-1:], real[2][1:2] + real[2][4:6]]  # a hole in the last sample too
    for b, cols in enumerate(keep):
        positions[b, cols] = True
    every = backbone(ids, mask, select="all")
    chosen = backbone(ids, mask, select="answer", positions=positions)
    offsets = torch.cumsum(torch.tensor([0, *lengths[:-1]]), 0)
    rows = [int(offsets[b]) + real[b].index(c) for b, cols in enumerate(keep) for c in cols]
    assert chosen.lengths.tolist() == [3, 1, 3]
    torch.testing.assert_close(chosen.acts, every.acts[rows])
    with pytest.raises(ValueError, match="marks a padding token"):
        backbone(ids, mask, select="answer", positions=mask == 0)
    with pytest.raises(ValueError, match="takes the positions"):
        backbone(ids, mask, select="answer")
