"""Balancer: the groups, slices, estimator and optimizer of a model as one object."""

import copy

import pytest
import torch
from torch import nn

from masked_optim import Balancer, ConcatFusion, MaskedMultiModalAdamW, ModalSignificance


class Net(nn.Module):
    def __init__(self, head="concat"):
        super().__init__()
        self.enc = nn.ModuleDict({"audio": nn.Sequential(nn.Linear(6, 8), nn.ReLU()), "image": nn.Sequential(nn.Linear(4, 8), nn.ReLU())})
        self.norm = nn.LayerNorm(16)  # neither an encoder nor the head: shared
        self.head = ConcatFusion({"audio": 8, "image": 8}, 3) if head == "concat" else nn.Linear(16, 3)

    def forward(self, x):
        feats = {m: self.enc[m](x[m]) for m in ("audio", "image")}
        if isinstance(self.head, ConcatFusion):
            return feats, self.head(feats).logits
        return feats, self.head(torch.cat([feats["audio"], feats["image"]], 1))


def _batch(step, n=32):
    g = torch.Generator().manual_seed(step)
    y = torch.randint(3, (n,), generator=g)
    x = {"audio": torch.randn(n, 6, generator=g) + nn.functional.one_hot(y, 6).float() * 2,
         "image": torch.randn(n, 4, generator=g)}
    return x, y


def _train(bal, model, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        x, y = _batch(step)
        feats, logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        bal.zero_grad()
        loss.backward()
        bal.update_rates(feats, y, logits=logits)
        bal.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_trains_a_concat_model_end_to_end_and_resumes_bit_identically(optimizer):
    torch.manual_seed(0)
    model = Net()
    kwargs = {"lr": 0.05, "momentum": 0.9} if optimizer == "sgd" else {"lr": 3e-3}
    bal = Balancer(model, {"audio": "enc.audio", "image": "enc.image"}, head="head", optimizer=optimizer, mask="amss+", **kwargs)
    assert bal.parameter_modality()["enc.audio.0.weight"] == "audio" and bal.parameter_modality()["norm.weight"] is None
    assert set(bal.parameter_modality()) == {n for n, _ in model.named_parameters()}  # nothing left out
    twin = copy.deepcopy(model)
    losses = _train(bal, model, 20)
    assert losses[-1] < losses[0]
    assert bal.estimator.last is not None and set(bal.optimizer.get_rates()) == {"audio", "image"}
    # resume: 10 steps, state_dict, 10 more == 20 in one go
    bal2 = Balancer(twin, {"audio": twin.enc["audio"], "image": twin.enc["image"]}, head=twin.head, optimizer=optimizer,
                    mask="amss+", **kwargs)
    _train(bal2, twin, 10)
    saved = copy.deepcopy(bal2.state_dict())
    twin2 = copy.deepcopy(twin)
    bal3 = Balancer(twin2, {"audio": "enc.audio", "image": "enc.image"}, head="head", optimizer=optimizer, mask="amss+", **kwargs)
    bal3.load_state_dict(saved)
    _train(bal3, twin2, 10, start=10)
    for p, q in zip(model.parameters(), twin2.parameters()):
        assert torch.equal(p, q)


def test_a_linear_head_checks_the_feature_order():
    model = Net(head="linear")
    bal = Balancer(model, {"audio": "enc.audio", "image": "enc.image"}, head="head", lr=0.1)
    x, y = _batch(0)
    feats, logits = model(x)
    bal.update_rates({"audio": feats["audio"], "image": feats["image"]}, y, logits=logits)  # the concat order
    with pytest.raises(ValueError, match=r"the slices do not sum to the fused logits .* \(got \['image', 'audio'\]\)"):
        bal.update_rates({"image": feats["image"], "audio": feats["audio"]}, y, logits=logits)


def test_without_a_head_the_modality_logits_are_passed():
    model = Net()
    bal = Balancer(model, {"audio": "enc.audio", "image": "enc.image"}, head=None, optimizer=lambda g: MaskedMultiModalAdamW(g, lr=1e-3),
                   estimator=ModalSignificance(rule="softmax"))
    x, y = _batch(0)
    feats, logits = model(x)
    with pytest.raises(ValueError, match=r"this Balancer has no head \(head=None\); pass modality_logits"):
        bal.update_rates(feats, y)
    rates = bal.update_rates(feats, y, modality_logits={m: torch.randn(32, 3) for m in feats})
    assert bal.optimizer.get_rates() == rates


def test_bad_specs_are_named():
    model = Net()
    with pytest.raises(ValueError, match=r"Invalid encoders\['audio'\]: 'enc.sound' is not a submodule of the model"):
        Balancer(model, {"audio": "enc.sound", "image": "enc.image"}, head="head")
    with pytest.raises(ValueError, match=r"Invalid encoders: parameter 'enc.audio.0.weight' is in the encoders of both 'audio' and 'image'"):
        Balancer(model, {"audio": "enc.audio", "image": "enc.audio"}, head="head")
    with pytest.raises(TypeError, match=r"Invalid head: LayerNorm; allowed: an nn.Linear over the concatenated features, a ConcatFusion, or None"):
        Balancer(model, {"audio": "enc.audio", "image": "enc.image"}, head="norm")
    with pytest.raises(ValueError, match=r"Invalid head: a Linear that is not part of the model"):
        Balancer(model, {"audio": "enc.audio", "image": "enc.image"}, head=nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"Invalid optimizer: 'adam'; allowed: one of \['adamw', 'sgd'\], or a callable"):
        Balancer(model, {"audio": "enc.audio", "image": "enc.image"}, head="head", optimizer="adam")
    bal = Balancer(model, {"audio": "enc.audio", "image": "enc.image"}, head="head")
    with pytest.raises(ValueError, match=r"Invalid state: keys \['optimizer'\]; allowed: the dict of Balancer.state_dict\(\)"):
        bal.load_state_dict({"optimizer": bal.optimizer.state_dict()})
