"""Fed MobiLLM's layer and width alignment: hand cases, and tiny random models of three families (no download)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from lightning_mobillm.backbone import FrozenBackbone
from lightning_mobillm.fed.alignment import (
    AlignmentError,
    BackboneType,
    WidthAlignment,
    aligned_backbone_config,
    aligned_layers,
    aligned_tap_spec,
    backbone_shape,
    federation_k,
    shared_width,
)
from lightning_mobillm.specs import BackboneConfig, TapSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors and models (see conftest)


# ---------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize(
    ("depth", "k", "layers"),
    [
        (30, 30, list(range(30))),  # SmolLM2-135M alone: every layer
        (30, 18, [1, 3, 4, 6, 8, 9, 11, 13, 14, 16, 18, 19, 21, 23, 24, 26, 28, 29]),  # SmolLM2 beside Gemma-3-270M
        (24, 18, [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23]),  # Qwen2.5-0.5B beside it
        (18, 18, list(range(18))),  # Gemma-3-270M, the shallowest
        (30, 1, [29]),
        (7, 3, [2, 4, 6]),
        (5, 2, [2, 4]),
        (1, 1, [0]),
    ],
)
def test_aligned_layers_by_hand(depth, k, layers):
    assert aligned_layers(depth, k) == layers


def test_aligned_layers_are_the_last_of_near_equal_blocks():
    for depth in range(1, 49):
        for k in range(1, depth + 1):
            layers = aligned_layers(depth, k)
            assert layers == [math.ceil(j * depth / k) - 1 for j in range(1, k + 1)]
            assert len(layers) == k and layers[-1] == depth - 1
            blocks = [b - a for a, b in zip([-1, *layers], layers)]  # block sizes, the first block included
            assert set(blocks) <= {depth // k, -(-depth // k)}, (depth, k, blocks)


def test_a_backbone_shallower_than_k_is_refused_by_name():
    with pytest.raises(AlignmentError, match=r"'gemma3-270m' has 18 layers, fewer than the federation's K = 24"):
        aligned_layers(18, 24, name="gemma3-270m")
    with pytest.raises(AlignmentError, match="has 3 layers.*K = 4"):
        aligned_layers(3, 4)
    for depth, k in [(0, 1), (4, 0), (4.0, 2), (True, 1), (4, None)]:
        with pytest.raises(AlignmentError, match="positive integer"):
            aligned_layers(depth, k)


def test_federation_k():
    depths = {"smollm2-135m": 30, "gemma3-270m": 18, "qwen2.5-0.5b": 24}
    assert federation_k(depths) == 18
    assert federation_k(depths, k=12) == 12
    assert federation_k([30, 24]) == 24
    with pytest.raises(AlignmentError, match=r"'gemma3-270m' has 18 layers.*K = 20"):
        federation_k(depths, k=20)
    with pytest.raises(AlignmentError, match=r"'#1' has 24 layers.*K = 25"):
        federation_k([30, 24], k=25)
    with pytest.raises(AlignmentError, match="at least one backbone"):
        federation_k({})
    with pytest.raises(AlignmentError, match="depth of backbone 'x'"):
        federation_k({"x": 0})


def test_shared_width_is_the_lower_median_or_given():
    assert shared_width([576, 640, 896]) == 640
    assert shared_width([896, 576]) == 576  # even count: the lower median, one of the widths
    assert shared_width([576, 640, 896, 1536]) == 640
    assert shared_width([576]) == 576
    assert shared_width([576, 640], d_star=512) == 512
    with pytest.raises(AlignmentError, match="at least one"):
        shared_width([])
    with pytest.raises(AlignmentError, match="positive integer"):
        shared_width([576, 0])


# ---------------------------------------------------------------------------------------------- types
def test_backbone_type_key():
    t = BackboneType("qwen2.5-0.5b", "qwen2", 896, 24)
    assert t.key == str(t) == "qwen2.5-0.5b/qwen2/d896-L24"
    assert BackboneType.from_key(t.key) == t
    assert BackboneType.from_key("gemma3-270m/gemma3_text/d640-L18").arch == "gemma3_text"
    # the same shape, another checkpoint: another type
    assert BackboneType("qwen2.5-coder-0.5b", "qwen2", 896, 24).key != t.key
    identity = {"arch": "llama", "name": "SmolLM2-135M-Instruct", "hidden_size": 576, "num_layers": 30,
                "is_decoder": True, "digest": "0" * 64}
    assert BackboneType.from_identity(identity).key == "smollm2-135m-instruct/llama/d576-L30"
    for key in ["smollm2-135m/llama/576x30", "a/b/d576-L30/x", "SmolLM2/llama/d576-L30", "a b/llama/d8-L2",
                "a/llama/d0-L2", "a/llama/d08-L2", "", None]:
        with pytest.raises(AlignmentError):
            BackboneType.from_key(key)
    with pytest.raises(AlignmentError, match="needs name, arch"):
        BackboneType.from_identity({"name": "x"})
    with pytest.raises(AlignmentError, match="pass name="):
        BackboneType.of(LlamaConfig(num_hidden_layers=2))


# ---------------------------------------------------------------------------------------------- three tiny families
def _tiny_configs() -> dict:
    """Three families of different widths and depths: K = 3 (gemma3's depth), d* = 48 (the median)."""
    common = dict(vocab_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return {
        "tiny-llama": LlamaConfig(**common, hidden_size=48, num_hidden_layers=6),
        "tiny-qwen2": Qwen2Config(**common, hidden_size=32, num_hidden_layers=5),
        "tiny-gemma3": Gemma3TextConfig(**common, hidden_size=64, head_dim=16, num_hidden_layers=3),
    }


@pytest.fixture(scope="module")
def tiny_family():
    """``{name: (type, hf_config, model)}`` of three tiny random decoders, built from configs."""
    out = {}
    for i, (name, config) in enumerate(_tiny_configs().items()):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
        out[name] = (BackboneType.of(config, name=name), config, model)
    return out


def test_three_families_k_layers_and_projection_shapes(tiny_family):
    types = {t.key: t for t, _, _ in tiny_family.values()}
    assert sorted(types) == ["tiny-gemma3/gemma3_text/d64-L3", "tiny-llama/llama/d48-L6", "tiny-qwen2/qwen2/d32-L5"]
    k = federation_k({key: t.num_layers for key, t in types.items()})
    assert k == 3
    specs = {name: aligned_tap_spec(config, k) for name, (_, config, _) in tiny_family.items()}
    assert specs["tiny-llama"] == TapSpec(layers=[1, 3, 5], hidden_size=48, arch="llama", is_decoder=True)
    assert specs["tiny-qwen2"] == TapSpec(layers=[1, 3, 4], hidden_size=32, arch="qwen2", is_decoder=True)
    assert specs["tiny-gemma3"] == TapSpec(layers=[0, 1, 2], hidden_size=64, arch="gemma3_text", is_decoder=True)
    assert backbone_shape(tiny_family["tiny-qwen2"][1]) == ("qwen2", 32, 5, True)
    with pytest.raises(AlignmentError, match="'tiny-gemma3/gemma3_text/d64-L3' has 3 layers.*K = 4"):
        federation_k({key: t.num_layers for key, t in types.items()}, k=4)

    alignment = WidthAlignment({key: t.hidden_size for key, t in types.items()}, k=k)
    assert alignment.shared_width == 48 and alignment.k == 3
    shapes = {key: tuple(alignment.projection(key).weight.shape) for key in types}
    assert shapes == {"tiny-llama/llama/d48-L6": (48, 48), "tiny-qwen2/qwen2/d32-L5": (48, 32),
                      "tiny-gemma3/gemma3_text/d64-L3": (48, 64)}
    assert alignment.types == {key: t.hidden_size for key, t in types.items()}


def _last_token_taps(model, layers: list[int], n: int = 3, seqlen: int = 5) -> torch.Tensor:
    """``[N, K, d_b]``: the aligned layers' hidden states at the last token (Hugging Face's ``hidden_states``;
    its last entry comes after the final norm, unlike :class:`FrozenBackbone`'s taps: shapes are what count here)."""
    ids = torch.randint(1, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, then every block
    assert len(hidden) == model.config.num_hidden_layers + 1
    return torch.stack([hidden[layer + 1][:, -1] for layer in layers], dim=1)


def test_tiny_models_taps_are_projected_and_only_their_type_learns(tiny_family):
    types = {name: t for name, (t, _, _) in tiny_family.items()}
    alignment = WidthAlignment({t.key: t.hidden_size for t in types.values()}, k=3)
    outputs = {}
    for name, (t, config, model) in tiny_family.items():
        taps = _last_token_taps(model, aligned_tap_spec(config, 3).layers)
        assert taps.shape == (3, 3, t.hidden_size)
        outputs[name] = alignment(taps, t.key)
        assert outputs[name].shape == (3, 3, 48) and outputs[name].dtype == torch.float32
        if t.hidden_size == 48:
            torch.testing.assert_close(outputs[name], taps)  # the median width's projection starts as the identity

    alignment.zero_grad(set_to_none=True)
    outputs["tiny-qwen2"].square().mean().backward()
    grads = {name: alignment.projection(t.key).weight.grad for name, t in types.items()}
    assert grads["tiny-qwen2"] is not None and grads["tiny-qwen2"].abs().sum() > 0
    assert alignment.projection(types["tiny-qwen2"].key).bias.grad.abs().sum() > 0
    assert grads["tiny-llama"] is None and grads["tiny-gemma3"] is None


def test_unknown_type_and_wrong_shapes_are_refused():
    key = "tiny-qwen2/qwen2/d32-L5"
    alignment = WidthAlignment({key: 32, "tiny-llama/llama/d48-L6": 48}, k=3)
    with pytest.raises(AlignmentError, match=r"unknown backbone type 'other'.*add_type"):
        alignment(torch.zeros(2, 3, 32), "other")
    cases = [torch.zeros(2, 3, 48), torch.zeros(2, 4, 32), torch.zeros(3, 32), torch.zeros(2, 3, 32, 1),
             torch.zeros(2, 3, 32, dtype=torch.int64)]
    for acts in cases:
        with pytest.raises(AlignmentError, match=rf"'{key}' expects floating activations \[N, 3, 32\].*got \[") as err:
            alignment(acts, key)
        assert str(list(acts.shape)) in str(err.value)
    with pytest.raises(AlignmentError, match="got list"):
        alignment([[0.0]], key)
    assert alignment.shared_width == 32  # the lower median of 32 and 48
    assert alignment(torch.zeros(0, 3, 32), key).shape == (0, 3, 32)
    assert alignment(torch.ones(2, 3, 32, dtype=torch.bfloat16), key).dtype == torch.float32


def test_a_new_type_joins_a_running_federation():
    first = "tiny-llama/llama/d48-L6"
    alignment = WidthAlignment({first: 48}, k=3)
    optimizer = torch.optim.SGD(alignment.parameters(), lr=0.1)
    alignment(torch.randn(4, 3, 48), first).square().mean().backward()
    optimizer.step()
    trained = alignment.projection(first).weight.detach().clone()

    newcomer = "qwen2.5-0.5b/qwen2/d32-L5"  # a key with dots: escaped as a module name
    assert newcomer not in alignment
    projection = alignment.add_type(newcomer, 32)
    optimizer.add_param_group({"params": projection.parameters()})
    assert newcomer in alignment and list(alignment.types) == [first, newcomer]
    assert any("qwen2%2E5-0%2E5b" in name for name in alignment.state_dict())
    before = projection.weight.detach().clone()
    optimizer.zero_grad()
    alignment(torch.randn(4, 3, 32), newcomer).square().mean().backward()
    optimizer.step()
    assert not torch.equal(projection.weight, before)
    torch.testing.assert_close(alignment.projection(first).weight, trained)  # the other type is untouched

    assert alignment.add_type(first, 48) is alignment.projection(first)  # idempotent: nothing re-initialised
    torch.testing.assert_close(alignment.projection(first).weight, trained)
    with pytest.raises(AlignmentError, match="known with width 48, not 64"):
        alignment.add_type(first, 64)
    with pytest.raises(AlignmentError, match="names width 32, not 40"):
        alignment.add_type("x/qwen2/d32-L5", 40)
    with pytest.raises(AlignmentError, match="non-empty string"):
        alignment.add_type("", 8)
    with pytest.raises(AlignmentError, match="positive integer"):
        alignment.add_type("y", 0)
    alignment.add_type("a.b", 8)
    alignment.add_type("a%2Eb", 8)  # distinct keys stay distinct module names
    assert len(alignment.projections) == 4


def test_initialisation_identity_or_norm_keeping_and_seeded_by_key():
    torch.manual_seed(1)
    a = WidthAlignment({"w": 32, "n": 64, "s": 48}, k=2)
    torch.manual_seed(2)
    b = WidthAlignment({"s": 48, "n": 64}, k=2, d_star=48)
    b.add_type("w", 32)  # another join order, another global RNG state: the same initial projections
    for key in ("w", "n", "s"):
        torch.testing.assert_close(a.projection(key).weight, b.projection(key).weight)
        assert torch.count_nonzero(a.projection(key).bias) == 0
    torch.testing.assert_close(a.projection("s").weight, torch.eye(48))
    wide, narrow = a.projection("w").weight, a.projection("n").weight  # 32 -> 48 and 64 -> 48
    torch.testing.assert_close(wide.T @ wide, torch.eye(32))  # an isometry
    torch.testing.assert_close(narrow @ narrow.T, torch.eye(48) * 64 / 48)  # norm kept in expectation
    assert not torch.allclose(WidthAlignment({"v": 32}, k=2, d_star=48).projection("v").weight, wide)


def test_state_dict_round_trip_and_device_dtype():
    a = WidthAlignment({"qwen2.5-0.5b/qwen2/d32-L5": 32, "m": 48}, k=3)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.5)
    b = WidthAlignment(a.types, k=a.k, d_star=a.shared_width)  # rebuilt from what a checkpoint records
    b.load_state_dict(a.state_dict())
    for key in a.types:
        torch.testing.assert_close(b.projection(key).weight, a.projection(key).weight)
    assert "_anchor" not in "".join(a.state_dict())

    c = WidthAlignment({}, k=3, d_star=16).to(torch.float64)
    assert c.add_type("late", 8).weight.dtype == torch.float64  # made in the module's dtype
    assert c(torch.ones(1, 3, 8), "late").dtype == torch.float64
    with pytest.raises(AlignmentError, match="at least one"):
        WidthAlignment({}, k=3)
    with pytest.raises(AlignmentError, match="positive integer"):
        WidthAlignment({"m": 48}, k=0)


# ---------------------------------------------------------------------------------------------- the framework's backbone
def test_backbone_config_tap_spec_without_weights_and_the_loaded_backbone(tiny_llama_dir, monkeypatch):
    config = BackboneConfig(source=str(tiny_llama_dir))
    with monkeypatch.context() as patch:  # only config.json may be read
        for cls in ("AutoModel", "AutoModelForCausalLM"):
            patch.setattr(f"transformers.{cls}.from_pretrained", _refuse_weights)
        spec = aligned_tap_spec(config, 3)  # the conftest's tiny Llama: 4 layers of width 32
        assert spec == TapSpec(layers=[1, 2, 3], hidden_size=32, arch="llama", is_decoder=True)
        aligned = aligned_backbone_config(config, 3)
        assert aligned == dataclasses.replace(config, layers=[1, 2, 3]) and config.layers == "all"
        t = BackboneType.of(config)
        assert t.key == f"{tiny_llama_dir.name.lower()}/llama/d32-L4"
    with pytest.raises(AlignmentError, match=rf"'{tiny_llama_dir.name}' has 4 layers.*K = 5"):
        aligned_tap_spec(config, 5)

    backbone = FrozenBackbone(aligned)
    assert backbone.tap_spec == spec == aligned_tap_spec(backbone, 3)
    assert BackboneType.of(backbone) == BackboneType.from_identity(backbone.identity()) == t
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    out = backbone(ids, torch.ones_like(ids), select="loss")  # the shortcut: one vector per tap per sample
    assert out.acts.shape == (2, 3, 32)
    with torch.no_grad():
        hidden = backbone.model(input_ids=ids, output_hidden_states=True).hidden_states
    for j, layer in enumerate(spec.layers[:-1]):  # the last tap is before the final norm, hidden_states' after
        torch.testing.assert_close(out.acts[:, j], hidden[layer + 1][:, -1])
    torch.testing.assert_close(backbone.model.model.norm(out.acts[:, -1]), hidden[-1][:, -1])

    alignment = WidthAlignment({t.key: 32, "other/qwen2/d16-L3": 16}, k=3, d_star=24)
    projected = alignment(out.acts.clone(), t.key)  # a clone: the backbone's outputs are inference tensors
    assert projected.shape == (2, 3, 24)
    projected.sum().backward()
    assert alignment.projection(t.key).weight.grad is not None
    assert alignment.projection("other/qwen2/d16-L3").weight.grad is None


def _refuse_weights(*args, **kwargs):
    raise AssertionError("weights were loaded")
