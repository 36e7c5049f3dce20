"""Device-secret target transforms (lightning_mobillm.privacy): fast checks on synthetic tensors."""

import pickle

import pytest
import torch

from lightning_mobillm.privacy import (
    DEFENCE_KNOBS,
    EmbedTransform,
    IdentityTransform,
    RotationTransform,
    compose_prediction,
    make_defence,
    make_transform,
    new_key,
    prediction_difference,
    randomized_response,
    sample_seeds,
    unbiased_onehot,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors and models (see conftest)

K = 5
ALL = [("identity", {}), ("rotation", {}), ("embed", {}), ("embed", {"out_dim": 32, "scale_range": 3.0})]
KEYS = torch.arange(64)


def _delta(b: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, K, generator=g) * 2
    labels = torch.randint(0, K, (b,), generator=g)
    return labels, logits, prediction_difference(labels, logits)


@pytest.mark.parametrize("name,knobs", ALL)
def test_inverse_of_forward_is_identity(name, knobs):
    _, _, delta = _delta()
    t = make_transform(name, K, key=b"k" * 32, **knobs)
    out = t.forward(delta)
    assert out.shape == (delta.shape[0], t.out_dim)
    torch.testing.assert_close(t.inverse(out), delta, atol=1e-5, rtol=0)


def test_embed_with_noise_inverts_up_to_the_noise_and_is_deterministic_per_sample():
    _, _, delta = _delta(b=32)
    keys = torch.arange(1000, 1032)
    t = EmbedTransform(K, key=new_key(), out_dim=16, sigma=0.5)
    with pytest.raises(ValueError, match="sample_keys"):
        t.forward(delta)
    a, b = t.forward(delta, keys), t.forward(delta, keys)
    assert torch.equal(a, b)  # the same sample always gets the same noise: no averaging by resending
    # a batch in another order gets the same per-sample targets
    perm = torch.randperm(32)
    torch.testing.assert_close(t.forward(delta[perm], keys[perm]), a[perm])
    resid = t.inverse(a) - delta
    assert resid.abs().max() > 1e-3  # the noise is really there
    # zero noise -> exact
    t0 = EmbedTransform(K, key=t._key, out_dim=16, sigma=0.0)
    torch.testing.assert_close(t0.inverse(t0.forward(delta)), delta, atol=1e-5, rtol=0)


def test_secret_is_not_in_public_config_repr_or_pickle():
    key = new_key()
    t = EmbedTransform(K, key=key, out_dim=16, sigma=0.1)
    cfg = t.public_config()
    text = repr(cfg) + repr(t) + t.key_fingerprint()
    assert key.hex() not in text and repr(key) not in text
    assert set(cfg) == {"name", "num_classes", "out_dim", "sigma", "scale_range", "offset_std", "rr_epsilon"}
    assert all(v is None or isinstance(v, (int, float, str)) for v in cfg.values())
    # the public config plus a different key gives a different transform; with the same key, the same one
    _, _, delta = _delta()
    same = make_transform(**cfg, key=key)
    other = make_transform(**cfg, key=new_key())
    keys = torch.arange(delta.shape[0])
    assert torch.equal(same.forward(delta, keys), t.forward(delta, keys))
    assert not torch.allclose(other.forward(delta, keys), t.forward(delta, keys), atol=1e-3)
    with pytest.raises(TypeError, match="secret"):
        pickle.dumps(t)


@pytest.mark.parametrize("name", ["rotation", "embed"])
def test_two_keys_give_different_transforms(name):
    _, _, delta = _delta()
    a = make_transform(name, K, key=1).forward(delta)
    b = make_transform(name, K, key=2).forward(delta)
    assert not torch.allclose(a, b, atol=1e-3)
    # and a fresh random key each time no key is given
    c = make_transform(name, K).forward(delta)
    d = make_transform(name, K).forward(delta)
    assert not torch.allclose(c, d, atol=1e-3)


def test_transform_computes_in_float32_and_validates_widths():
    _, _, delta = _delta(b=7)
    t = make_transform("embed", K, key=3, out_dim=20)
    out = t.forward(delta.double())
    assert out.dtype == torch.float32 and torch.equal(out, t.forward(delta))  # float64 in: the float32 result
    inv = t.inverse(out.to(torch.bfloat16))  # a bfloat16 target (e.g. a bf16 server) still inverts
    assert inv.dtype == torch.float32
    torch.testing.assert_close(inv, delta, atol=0.02, rtol=0)
    assert not torch.equal(inv, t.inverse(out))  # the bfloat16 rounding is really there
    with pytest.raises(ValueError):
        t.forward(delta[:, :3])
    with pytest.raises(ValueError):
        t.inverse(out[:, :5])
    with pytest.raises(ValueError):
        EmbedTransform(K, key=3, out_dim=3)
    with pytest.raises(ValueError):
        make_transform("rotation", K, out_dim=8)
    with pytest.raises(ValueError):
        make_transform("nope", K)


def test_identity_target_leaks_the_label():
    """Documents the leak: with no transform, argmax of the sent target is the label, for every sample."""
    labels, logits, delta = _delta(b=512)
    out = IdentityTransform(K).forward(delta)
    assert torch.equal(out.argmax(-1), labels)


def test_rotation_is_orthogonal_and_keeps_norms():
    _, _, delta = _delta()
    t = RotationTransform(K, key=5)
    torch.testing.assert_close(t.forward(delta).norm(dim=-1), delta.norm(dim=-1), atol=1e-5, rtol=0)


def test_compose_recovers_label_from_exact_correction():
    labels, logits, delta = _delta(b=128)
    t = make_transform("embed", K, key=9)
    scores = compose_prediction(logits, t.inverse(t.forward(delta)))
    assert torch.equal(scores.argmax(-1), labels)
    # zero correction = the backbone's own prediction
    assert torch.equal(compose_prediction(logits, torch.zeros_like(delta)).argmax(-1), logits.argmax(-1))


def test_randomized_response_rate_and_determinism():
    n = 4000
    labels = torch.arange(n) % K
    keys = torch.arange(n)
    noisy = randomized_response(labels, K, epsilon=1.0, key=b"r" * 32, sample_keys=keys)
    assert torch.equal(noisy, randomized_response(labels, K, 1.0, b"r" * 32, keys))
    keep = torch.e / (torch.e + K - 1)
    assert abs((noisy == labels).float().mean().item() - keep) < 0.03
    flipped = noisy[noisy != labels]
    assert flipped.min() >= 0 and flipped.max() < K
    # the flipped labels are spread over the other classes
    assert len(set((noisy[noisy != labels] - labels[noisy != labels]).remainder(K).tolist())) == K - 1


def test_sample_seeds_depend_on_key_and_sample():
    a = sample_seeds(b"a" * 32, [1, 2, 3])
    assert len(set(a)) == 3
    assert a != sample_seeds(b"b" * 32, [1, 2, 3])
    assert a == sample_seeds(b"a" * 32, torch.tensor([1, 2, 3]))
    # opaque keys (the activation cache's keyed hashes) as bytes or str
    h = sample_seeds(b"a" * 32, [b"f00d", "f00d", b"beef"])
    assert h[0] == h[1] != h[2]


def test_defence_randomized_response_inside_forward():
    labels, logits, delta = _delta(b=2000)
    keys = torch.arange(2000)
    t = make_defence(K, key=b"d" * 32)
    with pytest.raises(ValueError, match="sample_keys"):
        t.forward(delta)  # the coins are per sample: no keys, no target
    out = t.forward(delta, keys)
    assert torch.equal(out, t.forward(delta, keys))  # deterministic per sample key
    rec = t.inverse(out)  # = unbiased_onehot(y_rr) - p_b
    probs = torch.softmax(logits, -1)
    y_rr = (rec + probs).argmax(-1)
    eps = DEFENCE_KNOBS["rr_epsilon"]
    keep = torch.exp(torch.tensor(eps)) / (torch.exp(torch.tensor(eps)) + K - 1)
    assert abs((y_rr == labels).float().mean().item() - keep.item()) < 0.03
    torch.testing.assert_close(rec + probs, unbiased_onehot(y_rr, K, eps), atol=1e-4, rtol=0)
    # on average the target is still onehot(y) - p_b (debiased): class means of the decoded target
    for c in range(K):
        m = (rec + probs)[labels == c].mean(0)
        assert m.argmax().item() == c and abs(m[c].item() - 1.0) < 0.1
    with pytest.raises(ValueError, match="hard labels"):
        t.forward(torch.full((2, K), 0.3), keys[:2])  # not onehot - probs


def test_identity_with_defence_knobs_rejected_and_roundtrip():
    t = make_defence(K, key=4)
    again = make_transform(**t.public_config(), key=4)
    _, _, delta = _delta()
    assert torch.equal(again.forward(delta, KEYS), t.forward(delta, KEYS))
    with pytest.raises(ValueError):
        make_transform("identity", K, rr_epsilon=1.0)
