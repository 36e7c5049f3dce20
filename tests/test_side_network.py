"""Unit tests of the parallel-adapter side network and the SideTuningModule (fast, CPU only)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_mobillm.modules import SideTuningModule
from lightning_mobillm.optim import WarmupCosineLambda
from lightning_mobillm.side import BottleneckAdapter, ParallelAdapterSideNetwork
from lightning_mobillm.specs import BackboneConfig, TapSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors and models (see conftest)


def _net(L=3, d=16, C=4, **kw) -> ParallelAdapterSideNetwork:
    torch.manual_seed(0)
    return ParallelAdapterSideNetwork(num_taps=L, hidden_size=d, num_outputs=C, **kw)


def _perturb_up(net: ParallelAdapterSideNetwork) -> None:
    """Give the adapters non-zero W_up so they are no longer the identity."""
    with torch.no_grad():
        for a in net.adapters:
            a.up.weight.normal_(0, 0.2)


def _spec(L=3, d=16) -> TapSpec:
    return TapSpec(layers=list(range(L)), hidden_size=d, arch="llama", is_decoder=True)


# ------------------------------------------------------------------------------------ side network
@pytest.mark.parametrize("lengths", [[3, 1, 5], [1, 1, 1, 1], [7]])
@pytest.mark.parametrize("pool", ["last", "mean", "first"])
def test_packed_samples_do_not_see_each_other(lengths, pool):
    """A packed batch gives each sample what it gets alone, and changing one sample changes only its row."""
    net = _net(3, 16, 5, pool=pool).eval()
    _perturb_up(net)
    lengths = torch.tensor(lengths)
    acts = torch.randn(int(lengths.sum()), 3, 16, generator=torch.Generator().manual_seed(len(lengths)))
    out = net(acts, lengths)
    alone = torch.cat([net(a, torch.tensor([len(a)])) for a in acts.split(lengths.tolist())])
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-6)
    changed = acts.clone()
    changed[: int(lengths[0])] += 3.0 * torch.randn(int(lengths[0]), 3, 16)  # only sample 0's tokens
    out2 = net(changed, lengths)
    assert not torch.allclose(out2[0], out[0], atol=1e-4)
    torch.testing.assert_close(out2[1:], out[1:], rtol=1e-5, atol=1e-6)


def test_adapter_is_identity_at_init_and_width():
    a = BottleneckAdapter(24, reduction=8)
    assert a.bottleneck == 3
    x = torch.randn(5, 24)
    assert torch.equal(a(x), x)
    assert BottleneckAdapter(4, reduction=8).bottleneck == 1


def test_init_is_gated_fusion():
    net = _net(3, 8, 2, normalize_taps=False)
    acts = torch.randn(4, 3, 8)
    # Adapters are the identity at init, so s_L = 0.5 A_3 + 0.25 A_2 + 0.125 A_1.
    expected = 0.5 * acts[:, 2] + 0.25 * acts[:, 1] + 0.125 * acts[:, 0]
    assert torch.allclose(net.side_states(acts), expected, atol=1e-6)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_normalized_taps_scale_invariance(pool):
    net = _net(3, 16, 4, pool=pool).eval()
    _perturb_up(net)
    lengths = torch.tensor([2, 3, 1])
    acts = torch.randn(6, 3, 16)
    scale = torch.rand(6, 1, 1) * 50 + 0.1  # a different positive constant per token
    out1, out2 = net(acts, lengths), net(acts * scale, lengths)
    assert torch.allclose(out1, out2, atol=1e-4, rtol=1e-4)
    raw = _net(3, 16, 4, pool=pool, normalize_taps=False).eval()
    _perturb_up(raw)
    assert not torch.allclose(raw(acts, lengths), raw(acts * scale, lengths), atol=1e-3)


def test_last_pooling_picks_last_token():
    net = _net(2, 8, 3, pool="last").eval()
    _perturb_up(net)
    lengths = torch.tensor([3, 2, 4])
    acts = torch.randn(9, 2, 8)
    base = net(acts, lengths)
    last = torch.cumsum(lengths, 0) - 1  # 2, 4, 8
    for tok in range(9):
        changed = acts.clone()
        changed[tok] += torch.randn(2, 8) * 3
        out = net(changed, lengths)
        for b in range(3):
            same = torch.allclose(out[b], base[b])
            assert same != (tok == int(last[b])), (tok, b)


def test_mean_pooling_averages_the_token_outputs():
    """The side network is token-wise and its head affine, so with mean pooling a sample's output is the mean
    of what each of its tokens gives alone; with last pooling it is the last token's."""
    acts, lengths = torch.randn(10, 3, 12), torch.tensor([2, 1, 4, 3])
    per_token = {}
    for pool in ("mean", "last"):
        net = _net(3, 12, 4, pool=pool).eval()
        _perturb_up(net)
        per_token[pool] = net(acts, torch.ones(10, dtype=torch.long))
        out = net(acts, lengths)
        segments = per_token[pool].split(lengths.tolist())
        ref = torch.stack([s.mean(0) if pool == "mean" else s[-1] for s in segments])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # sample 0's two tokens give different outputs, so its mean and its last token really differ
    assert not torch.allclose(per_token["mean"][0], per_token["mean"][1], atol=1e-4)


def test_pool_modes_agree_with_one_token_per_sample():
    acts, lengths = torch.randn(5, 3, 8), torch.ones(5, dtype=torch.long)
    outs = []
    for pool in ("last", "mean", "first"):
        net = _net(3, 8, 2, pool=pool).eval()
        _perturb_up(net)
        outs.append(net(acts, lengths))
    assert torch.allclose(outs[0], outs[1], atol=1e-6) and torch.allclose(outs[0], outs[2], atol=1e-6)


def test_gradients_reach_every_adapter_and_gate():
    net = _net(4, 16, 3)
    acts, lengths = torch.randn(7, 4, 16), torch.tensor([3, 4])
    torch.nn.functional.cross_entropy(net(acts, lengths), torch.tensor([0, 2])).backward()
    assert bool((net.gate_alpha.grad.abs() > 0).all())
    for a in net.adapters:  # W_up is zero, so at init W_down gets no gradient yet
        assert a.up.weight.grad.abs().sum() > 0 and a.down.weight.grad.abs().sum() == 0


def test_a_few_optimizer_steps_move_every_side_weight():
    """The module's own optimizer (no weight decay here, so any change is a gradient step) trains every
    weight of the side network: W_down too, once W_up has left zero."""
    torch.manual_seed(0)
    m = _module(weight_decay=0.0, lr=1e-2, total_steps=10)
    m.build(_spec(L=4))
    before = _state(m)
    opt = m.configure_optimizers()["optimizer"]
    acts, lengths, labels = torch.randn(7, 4, 16), torch.tensor([3, 4]), torch.tensor([0, 2])
    for _ in range(3):
        opt.zero_grad()
        m.training_step({"acts": acts, "lengths": lengths, "labels": labels}).backward()
        opt.step()
    after = m.state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == [], unchanged


@pytest.mark.parametrize(
    "acts,lengths,match",
    [
        (torch.randn(4, 16), torch.tensor([4]), "shape"),
        (torch.randn(4, 2, 16), torch.tensor([4]), "L=3"),
        (torch.randn(4, 3, 8), torch.tensor([4]), "d=16"),
        (torch.randn(4, 3, 16), torch.tensor([2, 1]), "sum to 3"),
        (torch.randn(4, 3, 16), torch.tensor([4, 0]), ">= 1"),
        (torch.randn(4, 3, 16), torch.tensor([[4]]), "1-D"),
        (torch.randn(4, 3, 16), torch.tensor([4.0]), "integer"),
        (torch.randint(0, 3, (4, 3, 16)), torch.tensor([4]), "floating"),
    ],
)
def test_bad_inputs_raise(acts, lengths, match):
    with pytest.raises(ValueError, match=match):
        _net(3, 16, 2)(acts, lengths)


def test_bad_constructor_args_raise():
    with pytest.raises(ValueError, match="pool"):
        ParallelAdapterSideNetwork(2, 8, 2, pool="max")
    with pytest.raises(ValueError, match="activation"):
        ParallelAdapterSideNetwork(2, 8, 2, activation="nope")


# ------------------------------------------------------------------------------------ module
def _module(**kw) -> SideTuningModule:
    kw.setdefault("num_classes", 3)
    return SideTuningModule(**kw)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_build_is_seeded_and_idempotent():
    rng_before = torch.random.get_rng_state()
    a, b, c = _module(seed=7), _module(seed=7), _module(seed=8)
    assert not a.is_built
    for m in (a, b, c):
        m.build(_spec())
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # build does not touch the global RNG
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    a.build(_spec())  # same spec: no-op
    assert all(torch.equal(sa[k], v) for k, v in a.state_dict().items())
    with pytest.raises(ValueError, match="already built"):
        a.build(_spec(L=4))
    with pytest.raises(ValueError, match="num_classes"):
        SideTuningModule().build(_spec())
    with pytest.raises(ValueError, match="conflicts"):
        _module(num_classes=3).build(_spec(), num_classes=5)
    with pytest.raises(RuntimeError, match="not built"):
        _module()(torch.randn(1, 3, 16), torch.tensor([1]))


def test_hparams_json_round_trip():
    m = SideTuningModule(
        backbone=BackboneConfig(source="minilm-l6", layers=[0, 2, 4]), pool="mean", betas=(0.8, 0.99)
    )
    m.build(_spec(), num_classes=4)
    m.total_steps = 17
    d = json.loads(json.dumps(m.hparams_dict()))
    assert d["backbone"]["layers"] == [0, 2, 4] and d["num_classes"] == 4 and d["total_steps"] == 17
    m2 = SideTuningModule.from_hparams_dict(d)
    assert isinstance(m2.backbone_config, BackboneConfig)
    assert m2.backbone_config == m.backbone_config
    assert m2.hparams["betas"] == (0.8, 0.99) and m2.total_steps == 17
    m2.build(_spec())
    acts, lengths = torch.randn(5, 3, 16), torch.tensor([2, 3])
    m.eval(), m2.eval()
    assert torch.equal(m(acts, lengths), m2(acts, lengths))
    assert SideTuningModule().backbone_config == BackboneConfig()


def test_scheduler_values():
    lam = WarmupCosineLambda(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lam(0) == pytest.approx(0.1)
    assert lam(4) == pytest.approx(0.5)
    assert lam(9) == pytest.approx(1.0)
    assert lam(10) == pytest.approx(1.0)
    assert lam(55) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lam(100) == pytest.approx(0.1)
    assert lam(1000) == pytest.approx(0.1)

    m = _module(lr=0.01, warmup_ratio=0.1, min_lr_ratio=0.0, total_steps=50)
    m.build(_spec())
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    expected = {0: 0.01 * 1 / 5, 3: 0.01 * 4 / 5, 5: 0.01, 15: 0.01 * 0.5 * (1 + math.cos(math.pi * 10 / 45))}
    for step in range(16):
        if step in expected:
            assert opt.param_groups[0]["lr"] == pytest.approx(expected[step]), step
        opt.step()
        sched.step()
    state = sched.state_dict()
    json.dumps({k: v for k, v in state.items() if k != "lr_lambdas"})
    json.dumps(state["lr_lambdas"])  # the lambda's __dict__: numbers only


def test_weight_decay_shrinks_matrices_only_and_total_steps_is_required():
    m = _module(weight_decay=0.5, lr=0.1, warmup_ratio=0.0)
    m.build(_spec())
    with pytest.raises(ValueError, match="total_steps"):
        m.configure_optimizers()
    m.total_steps = 10
    with torch.no_grad():  # no parameter at zero, so that a decay shows everywhere
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    opt = m.configure_optimizers()["optimizer"]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)  # a zero gradient: only decoupled weight decay moves anything
    opt.step()
    for n, p in m.named_parameters():
        if p.ndim >= 2:  # adapter and head matrices decay by lr * weight_decay
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5), msg=n)
        else:  # biases, norm weights and gates are not decayed
            assert torch.equal(p.detach(), before[n]), n


def _separable(n=256, L=3, d=16, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(C, d, generator=g) * 2
    labels = torch.randint(0, C, (n,), generator=g)
    acts = torch.randn(n, L, d, generator=g)
    acts[:, 1, :] += centroids[labels]  # the class only shows in layer 1's features
    return acts, labels


def test_manual_training_loop_learns():
    torch.manual_seed(0)
    acts, labels = _separable()
    m = SideTuningModule.from_hparams_dict(json.loads(json.dumps(_module(lr=1e-2).hparams_dict())))
    m.build(_spec())
    m.total_steps = 100
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    m.train()
    losses = []
    for step in range(100):
        idx = torch.randint(0, len(labels), (32,))
        batch = {"acts": acts[idx], "lengths": torch.ones(32, dtype=torch.long), "labels": labels[idx]}
        loss = m.training_step(batch, step)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    m.eval()
    full = {"acts": acts, "lengths": torch.ones(len(labels), dtype=torch.long), "labels": labels}
    with torch.no_grad():
        _, logits = m.compute_loss(full)
    assert (logits.argmax(-1) == labels).float().mean() > 0.9
    m.update_eval_metrics("val", logits, labels)  # outside a Trainer: updates, no logging
    metrics = m.compute_eval_metrics("val")
    assert set(metrics) == {"val/acc", "val/f1"} and metrics["val/acc"] > 0.9
    out = m.predict_step({"acts": acts[:4].double(), "lengths": torch.ones(4, dtype=torch.long)}, 0)
    torch.testing.assert_close(out["logits"], logits[:4])  # float64 input is cast to the side network's dtype
    assert torch.equal(out["preds"], logits[:4].argmax(-1))


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, acts, labels):
        self.acts, self.labels = acts, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"acts": self.acts[i], "lengths": torch.tensor(1), "labels": self.labels[i]}


def test_load_from_checkpoint_via_trainer(tmp_path):
    import lightning

    acts, labels = _separable(n=32)
    loader = torch.utils.data.DataLoader(_DictDataset(acts, labels), batch_size=8)
    m = _module(backbone=BackboneConfig(layers=[0, 1, 2]))
    m.build(_spec())
    trainer = lightning.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(m, loader, loader)
    assert trainer.global_step == 2
    val_metrics = trainer.validate(m, loader, verbose=False)[0]
    assert {"val/loss", "val/acc", "val/f1"} <= set(val_metrics)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    loaded = SideTuningModule.load_from_checkpoint(path)
    assert loaded.is_built and loaded.tap_spec == _spec()
    assert loaded.backbone_config == BackboneConfig(layers=[0, 1, 2])
    m.eval(), loaded.eval()
    x, lengths = torch.randn(6, 3, 16), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.allclose(m(x, lengths), loaded(x, lengths))
        # ... and those are the trained weights, not the seeded initial ones
        fresh = _module(backbone=BackboneConfig(layers=[0, 1, 2]))
        fresh.build(_spec())
        assert not torch.allclose(fresh.eval()(x, lengths), loaded(x, lengths), atol=1e-4)
    test_metrics = trainer.test(m, loader, verbose=False)[0]
    assert {"test/loss", "test/acc", "test/f1"} <= set(test_metrics)
