"""Fed MobiLLM's shared side network: shapes, routing to per-device heads, components joining a running
optimizer, rebuilding from a structure, and what a device downloads (tiny widths, no backbone)."""

from __future__ import annotations

import pytest
import torch

from lightning_mobillm.fed.alignment import AlignmentError
from lightning_mobillm.fed.model import (
    DEFAULT_HEAD_RANK,
    SHARED_HEAD,
    FedBatch,
    FedDownload,
    FedPart,
    FedSideModule,
)
from lightning_mobillm.privacy import make_transform, prediction_difference
from lightning_mobillm.server_config import ServerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (see conftest)

A, B = "tiny-a/llama/d12-L4", "tiny-b/qwen2/d16-L6"
K, OUT = 2, 6


def _module(**kwargs) -> FedSideModule:
    kwargs.setdefault("head_rank", None)  # no neck unless a test asks for one: d* x out_dim heads
    return FedSideModule({A: 12, B: 16}, K, kwargs.pop("out_dim", OUT), reduction=4, **kwargs)


def _trained_heads(module: FedSideModule) -> FedSideModule:
    """Heads start at zero (no gradient reaches the trunk through them yet): give them trained-looking weights."""
    with torch.no_grad():
        for i, head in enumerate(module.heads.values()):
            head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=torch.Generator().manual_seed(i)))
    return module


def _acts(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, K, width, generator=torch.Generator().manual_seed(seed))


def _grads(module: FedSideModule) -> dict[str, bool]:
    """Which components got a gradient."""
    return {name: any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.component(name).parameters())
            for name in module.components}


def test_shapes_width_and_defaults():
    module = _module()
    assert module.shared_width == 12  # the lower median of 12 and 16
    assert module.components == ["trunk", f"type:{A}", f"type:{B}"]
    module.add_device("phone-1")
    assert module(_acts(5, 12), A, "phone-1").shape == (5, OUT)
    assert module(_acts(3, 16), B, ["phone-1"] * 3).shape == (3, OUT)
    with pytest.raises(AlignmentError, match=r"\[N, 2, 12\]"):
        module(_acts(2, 16), A, "phone-1")  # B's width under A's type
    with pytest.raises(AlignmentError, match="unknown backbone type"):
        module(_acts(2, 12), "other/llama/d12-L4", "phone-1")
    with pytest.raises(ValueError, match="no head"):
        module(_acts(2, 12), A, "phone-2")
    with pytest.raises(ValueError, match="target_space"):
        _module(target_space="label")


def test_a_type_shallower_than_k_or_of_another_width_is_refused():
    module = _module()
    with pytest.raises(AlignmentError, match="fewer than the federation's K"):
        module.add_type("tiny-d/llama/d12-L1", 12)
    with pytest.raises(AlignmentError, match="names width 20"):
        module.add_type("tiny-d/llama/d20-L4", 12)
    with pytest.raises(AlignmentError, match="width 12, not 16"):
        module.add_type(A, 16)
    assert module.components == ["trunk", f"type:{A}", f"type:{B}"]


def test_a_devices_loss_reaches_only_its_head_the_trunk_and_its_types_projection():
    module = _module()
    for device in ("d0", "d1", "d2"):
        module.add_device(device)
    _trained_heads(module)
    batch = FedBatch([FedPart(A, _acts(4, 12), ("d0",) * 4, torch.randn(4, OUT))])
    loss, outputs = module.compute_loss(batch)
    loss.backward()
    assert outputs.shape == (4, OUT)
    assert _grads(module) == {"trunk": True, f"type:{A}": True, f"type:{B}": False,
                              "head:d0": True, "head:d1": False, "head:d2": False}


def test_a_mixed_batch_routes_each_sample_to_its_devices_head():
    module = _module()
    for device in ("d0", "d1", "d2"):
        module.add_device(device)
    _trained_heads(module)
    acts = _acts(5, 12)
    devices = ["d0", "d1", "d0", "d2", "d1"]
    mixed = module(acts, A, devices)
    for i, device in enumerate(devices):
        torch.testing.assert_close(mixed[i], module(acts[i:i + 1], A, device)[0])
    # a batch across two types and three devices: the loss is the MSE over every sample and output
    targets_a, targets_b = torch.randn(5, OUT), torch.randn(2, OUT)
    batch = FedBatch([FedPart(A, acts, tuple(devices), targets_a), FedPart(B, _acts(2, 16), ("d2", "d2"), targets_b)])
    loss, outputs = module.compute_loss(batch)
    expected = torch.cat([mixed, module(batch.parts[1].acts, B, "d2")])
    torch.testing.assert_close(outputs, expected)
    torch.testing.assert_close(loss, ((expected - torch.cat([targets_a, targets_b])) ** 2).mean())
    module.zero_grad()
    loss.backward()
    assert all(_grads(module).values())


def test_new_devices_and_types_join_a_running_optimizer_as_named_groups():
    module = _module(lr=0.05)
    optimizer = module.configure_optimizers()
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["trunk", "trunk/no_decay", f"type:{A}", f"type:{A}/no_decay", f"type:{B}", f"type:{B}/no_decay"]
    assert module.add_device("d0", optimizer) and not module.add_device("d0", optimizer)
    late = "tiny-c/gemma3_text/d20-L3"
    assert module.add_type(late, 20, optimizer) and not module.add_type(late, 20, optimizer)
    assert [g["name"] for g in optimizer.param_groups][len(names):] == [
        "head:d0", "head:d0/no_decay", f"type:{late}", f"type:{late}/no_decay"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.parameters()}  # every parameter, each once
    assert optimizer.param_groups[-2]["weight_decay"] == 0.01 and optimizer.param_groups[-1]["weight_decay"] == 0
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loss, _ = module.compute_loss(FedBatch([FedPart(late, _acts(3, 20), ("d0",) * 3, torch.randn(3, OUT))]))
    loss.backward()
    optimizer.step()
    after = module.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("heads.d0.") for k in changed)
    assert any(k.startswith(f"alignment.projections.{late}.") for k in changed)
    assert not any("tiny-a" in k or "tiny-b" in k for k in changed)  # the other types' projections did not move


@pytest.mark.parametrize("head_rank", [None, 4])
def test_initial_weights_do_not_depend_on_the_order_devices_and_types_joined(head_rank):
    one, two = _module(head_rank=head_rank), FedSideModule({B: 16, A: 12}, K, OUT, reduction=4, head_rank=head_rank)
    for device in ("x", "y"):
        one.add_device(device)
    for device in ("y", "x"):
        two.add_device(device)
    s1, s2 = one.state_dict(), two.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not any(s1[k].any() for k in s1 if k.startswith("heads."))  # every head starts at zero
    other = _module(seed=1, head_rank=head_rank)
    assert not torch.equal(s1["trunk.adapters.0.down.weight"], other.state_dict()["trunk.adapters.0.down.weight"])


@pytest.mark.parametrize("space", ["federation", "plain"])
def test_shared_target_spaces_have_one_head(space):
    module = _module(target_space=space)
    assert module.head_keys == [SHARED_HEAD]
    assert not module.add_device("d0") and not module.add_device("d1")
    torch.testing.assert_close(module(_acts(3, 12), A, ["d0", "d1", "d0"]), module(_acts(3, 12), A, "d1"))
    download = module.download("d0", A)
    torch.testing.assert_close(download.state["head.proj.weight"], module.heads[SHARED_HEAD].proj.weight)


def test_a_download_holds_the_trunk_its_projection_and_its_own_head_only():
    module = _module()
    for device in ("d0", "d1"):
        module.add_device(device)
    _trained_heads(module)
    download = module.download("d1", B)
    prefixes = {k.split(".")[0] for k in download.state}
    assert prefixes == {"projection", "trunk", "head"}
    assert set(download.state) == ({f"trunk.{k}" for k in module.trunk.state_dict()}
                                   | {"projection.weight", "projection.bias", "head.proj.weight", "head.proj.bias"})
    torch.testing.assert_close(download.state["head.proj.weight"], module.heads["d1"].proj.weight)
    assert not torch.equal(download.state["head.proj.weight"], module.heads["d0"].proj.weight)
    torch.testing.assert_close(download.state["projection.weight"], module.alignment.projection(B).weight)
    assert download.nbytes == sum(t.numel() * 4 for t in download.state.values())
    # copies: training on the server later does not change what the device holds
    assert all(t.data_ptr() != p.data_ptr() for t in download.state.values() for p in module.parameters())
    with pytest.raises(ValueError, match="no head"):
        module.download("d9", B)


def test_a_neck_makes_each_device_head_small_and_travels_with_the_download():
    module = _module(head_rank=4)
    assert module.components[:2] == ["trunk", "neck"] and module.head_width == 4
    module.add_device("d1")
    assert module.heads["d1"].proj.weight.shape == (OUT, 4)  # r x out_dim, not d* x out_dim
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    module.eval()
    download = module.download("d1", B)
    assert {"neck.weight", "neck.bias"} <= set(download.state) and download.config["head_rank"] == 4
    acts = _acts(5, 16, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(download.build()(acts), module(acts, B, "d1"))
    rebuilt = FedSideModule.rebuild(module.config(), module.structure())
    rebuilt.load_state_dict(module.state_dict())  # the same structure, the neck included
    assert len(module.configure_optimizers().param_groups) == len(rebuilt.configure_optimizers().param_groups)
    with pytest.raises(ValueError, match="head_rank"):
        _module(head_rank=0)
    default = FedSideModule({A: 12}, K, OUT)  # a neck unless told otherwise
    assert default.head_width == DEFAULT_HEAD_RANK and default.components[:2] == ["trunk", "neck"]
    # the server's config spells the same default (it stays free of torch, so it cannot import the constant)
    assert ServerConfig().fed_head_rank == DEFAULT_HEAD_RANK


def test_the_device_model_computes_what_the_server_does_and_composes_with_its_inverse():
    module = _module()
    module.add_device("d1")
    with torch.no_grad():  # a trained-looking model: non-zero adapters
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    module.eval()
    download = FedDownload(**vars(module.download("d1", B)))
    device_model = download.build()
    acts = _acts(7, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(device_model(acts), module(acts, B, "d1"))
    transform = make_transform("embed", 3, key="d1-secret", out_dim=OUT)
    logits = torch.randn(7, 3)
    scores = device_model.scores(acts, logits, transform)
    expected = torch.softmax(logits, -1) + transform.inverse(module(acts, B, "d1").detach())
    torch.testing.assert_close(scores, expected)
    # a perfect side output gives back the labels
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    perfect = transform.forward(prediction_difference(labels, logits))
    torch.testing.assert_close(torch.softmax(logits, -1) + transform.inverse(perfect),
                               torch.nn.functional.one_hot(labels, 3).float(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\[N, 2, 16\]"):
        device_model(_acts(2, 12))


def test_rebuild_makes_the_same_components_in_the_same_order_and_takes_the_optimizer_state():
    module = _module()
    optimizer = module.configure_optimizers()
    module.add_device("d0", optimizer)
    late = "tiny-c/gemma3_text/d20-L3"
    module.add_type(late, 20, optimizer)
    module.add_device("d1", optimizer)
    loss, _ = module.compute_loss(FedBatch([FedPart(late, _acts(3, 20), ("d1",) * 3, torch.randn(3, OUT))]))
    loss.backward()
    optimizer.step()
    copy = FedSideModule.rebuild(module.config(), module.structure())
    assert copy.components == module.components == ["trunk", f"type:{A}", f"type:{B}", "head:d0", f"type:{late}",
                                                    "head:d1"]
    copy.load_state_dict(module.state_dict())
    copied = copy.configure_optimizers()
    copied.load_state_dict(optimizer.state_dict())
    assert [g["name"] for g in copied.param_groups] == [g["name"] for g in optimizer.param_groups]
    for bad, match in [({**module.structure(), "components": ["trunk", "head:x", "head:x"]}, "twice"),
                       ({**module.structure(), "components": ["trunk", "type:zzz"]}, "unknown component"),
                       ({**module.structure(), "components": ["head:d0"]}, "start with"),
                       ({**module.structure(), "extra": 1}, "exactly")]:
        with pytest.raises(ValueError, match=match):
            FedSideModule.rebuild(module.config(), bad)
    with pytest.raises(ValueError, match="exactly"):
        FedSideModule.rebuild({**module.config(), "lr_schedule": 1}, module.structure())
