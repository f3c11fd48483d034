"""Balancer: the groups, slices, estimator and optimizer of a model as one object."""

import copy

import pytest
import torch
from torch import nn

from masked_optim import Balancer, ConcatFusion, MaskedMultiModalAdamW, ModalSignificance
from tolerances import TOLERANCES


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


class AttentionNet(nn.Module):
    """Cross-attention fusion: no slice logits exist."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleDict({"audio": nn.Sequential(nn.Linear(6, 8), nn.ReLU()), "image": nn.Sequential(nn.Linear(4, 8), nn.ReLU())})
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cls = nn.Linear(8, 3)

    def forward(self, x):
        feats = {m: self.enc[m](x[m]) for m in ("audio", "image")}
        tokens = torch.stack([feats["audio"], feats["image"]], 1)
        fused, _ = self.attn(tokens, tokens, tokens)
        return feats, self.cls(fused.mean(1))


def test_probe_signal_trains_an_attention_model_end_to_end_and_resumes():
    torch.manual_seed(0)
    model = AttentionNet()
    twin = copy.deepcopy(model)
    make = lambda m: Balancer(m, {"audio": "enc.audio", "image": "enc.image"}, signal="probes", mask="amss+",  # noqa: E731
                              lr=0.05, momentum=0.9, probe_options={"lr": 0.05})
    bal = make(model)
    assert bal.probes is None and "probes" not in bal.state_dict()
    losses = _train(bal, model, 40)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert bal.probes is not None and bal.probes.dims == {"audio": 8, "image": 8} and bal.probes.num_classes == 3
    assert bal.probes.steps == 40
    assert bal.estimator.last is not None and set(bal.optimizer.get_rates()) == {"audio", "image"}
    # audio carries the label (the batches make it so), image is noise: the probes see it
    mi = bal.estimator.last.mutual_information
    assert mi["audio"] > mi["image"]
    # resume: 20 steps, state_dict (with "probes"), 20 more on a fresh Balancer == 40 in one go
    other = make(twin)
    _train(other, twin, 20)
    state = copy.deepcopy(other.state_dict())
    assert set(state) == {"optimizer", "estimator", "probes"}
    model2 = copy.deepcopy(twin)
    resumed = make(model2)
    resumed.load_state_dict(state)
    _train(resumed, model2, 20, start=20)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_probe_signal_options_are_checked():
    model = AttentionNet()
    enc = {"audio": "enc.audio", "image": "enc.image"}
    with pytest.raises(ValueError, match="Invalid signal: 'logits'"):
        Balancer(model, enc, signal="logits")
    with pytest.raises(ValueError, match="Invalid probe_dims"):
        Balancer(model, enc, signal="probes", probe_dims={"audio": 8})
    with pytest.raises(ValueError, match="only with signal='probes'"):
        Balancer(model, enc, probe_dims={"audio": 8, "image": 8})
    bal = Balancer(model, enc, signal="probes", probe_dims={"audio": 8, "image": 8}, num_classes=3, lr=0.1)
    assert bal.probes is not None  # built at once when dims and classes are known
    x, y = _batch(0)
    feats, _ = model(x)
    bal.update_rates(feats, y)  # no logits needed: num_classes given
    with pytest.raises(ValueError, match="Invalid modality_logits with signal='probes'"):
        bal.update_rates(feats, y, modality_logits={m: torch.zeros(32, 3) for m in feats})
    lazy = Balancer(model, enc, signal="probes", lr=0.1)
    with pytest.raises(ValueError, match="needs the number of classes"):
        lazy.update_rates(feats, y)
    with pytest.raises(ValueError, match="holds probes but this Balancer has signal='slices'"):
        Balancer(model, enc, lr=0.1).load_state_dict(bal.state_dict())


class TiedNet(nn.Module):
    """Both encoders end in the same projection (a tied weight), and a fusion layer reads only audio."""

    def __init__(self):
        super().__init__()
        tied = nn.Linear(8, 8)
        self.enc = nn.ModuleDict({"audio": nn.Sequential(nn.Linear(6, 8), nn.ReLU(), tied),
                                  "image": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), tied)})
        self.audio_gate = nn.Linear(8, 8)  # outside the encoders, fed by audio's features only
        self.head = ConcatFusion({"audio": 8, "image": 8}, 3)

    def forward(self, x):
        feats = {"audio": self.audio_gate(self.enc["audio"](x["audio"])), "image": self.enc["image"](x["image"])}
        return feats, self.head(feats).logits


def test_a_tied_weight_is_an_error_that_says_what_to_do():
    with pytest.raises(ValueError, match=r"parameter 'enc.audio.2.weight' is in the encoders of both 'audio' and 'image'; "
                                         r"allowed: each parameter in one modality\. A weight both modalities use \(tied\): "
                                         r"pass shared=\['enc.audio.2.weight'\] \(trained dense, never masked\), or "
                                         r"assign=\{'enc.audio.2.weight': <modality>\}"):
        Balancer(TiedNet(), {"audio": "enc.audio", "image": "enc.image"}, head="head")


@pytest.mark.parametrize("how", ["shared", "assign"])
def test_shared_trains_a_tied_weight_dense_and_assign_at_its_modality_rate(how):
    """A ``shared`` weight takes torch.optim.SGD's step whatever the rates; an assigned one its modality's
    (``mask="scale"``: SGD with ``lr * rate``), as do the rest of its modality's parameters."""
    torch.manual_seed(0)
    model = TiedNet()
    spec = {"shared": {"shared": ["enc.image.2"]},  # the module, by its other name: both its parameters
            "assign": {"assign": {"enc.audio.2": "image", model.audio_gate.weight: "audio"}}}[how]
    bal = Balancer(model, {"audio": "enc.audio", "image": "enc.image"}, head="head", lr=0.1, mask="scale", **spec)
    where = bal.parameter_modality()
    tied_group = None if how == "shared" else "image"
    assert where["enc.audio.2.weight"] == where["enc.audio.2.bias"] == tied_group
    assert where["enc.audio.0.weight"] == "audio" and where["enc.image.0.weight"] == "image"
    assert where["audio_gate.weight"] == ("audio" if how == "assign" else None) and where["audio_gate.bias"] is None
    assert sum(len(g["params"]) for g in bal.optimizer.param_groups) == len(list(model.parameters()))  # each once
    x, y = _batch(0)
    feats, logits = model(x)
    nn.functional.cross_entropy(logits, y).backward()
    rate = {"audio": 0.25, "image": 0.5, None: 1.0}
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    bal.optimizer.step(rates={"audio": 0.25, "image": 0.5})
    for n, p in model.named_parameters():
        p0, g = before[n]
        # plain SGD (no momentum, no decay) at lr * rate: p - lr * rate * g. Within float32's tolerance,
        # not bit for bit: torch's add(alpha=) rounds once (a fused multiply-add on its AVX2/AVX-512
        # kernels), the cpp kernel rounds rate * g, lr * that and the difference as the reference does
        # (1 ulp apart on the Intel VM). Another rate is far outside the tolerance.
        expected = p0.add(g, alpha=-0.1 * rate[where[n]])
        torch.testing.assert_close(p.detach(), expected, **TOLERANCES[torch.float32], msg=n)
        if bool(g.abs().max() > 1e-3):
            other = p0.add(g, alpha=-0.1 * (0.75 if where[n] is not None else 0.5))
            assert not torch.allclose(p.detach(), other, **TOLERANCES[torch.float32]), n


def test_shared_and_assign_are_checked():
    model = TiedNet()
    encs = {"audio": "enc.audio", "image": "enc.image"}
    with pytest.raises(ValueError, match=r"Invalid assign\['audio_gate'\]: 'video'; allowed: one of the encoders' modalities \['audio', 'image'\]"):
        Balancer(model, encs, head="head", shared=["enc.audio.2"], assign={"audio_gate": "video"})
    with pytest.raises(ValueError, match=r"Invalid assign\['enc.image.2.bias'\]: parameter 'enc.audio.2.bias' is also placed in shared; allowed: one place per parameter"):
        Balancer(model, encs, head="head", shared=["enc.audio.2"], assign={"enc.image.2.bias": "audio"})
    with pytest.raises(ValueError, match=r"Invalid shared\[0\]: 'enc.audio.9' is not a submodule of the model"):
        Balancer(model, encs, head="head", shared=["enc.audio.9"])
    with pytest.raises(ValueError, match=r"Invalid shared\[1\]: a parameter of shape \(2,\) that is not in the model"):
        Balancer(model, encs, head="head", shared=["enc.audio.2", nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match=r"Invalid shared\[0\]: int; allowed: a qualified name, a submodule or a parameter"):
        Balancer(model, encs, head="head", shared=[3])
    with pytest.raises(ValueError, match=r"Invalid shared\[0\]: 'enc.audio.1' has no trainable parameter"):
        Balancer(model, encs, head="head", shared=["enc.audio.1"])
    with pytest.raises(TypeError, match=r"Invalid assign: list; allowed: a dict \{parameter or submodule: modality\}"):
        Balancer(model, encs, head="head", shared=["enc.audio.2"], assign=[("audio_gate", "audio")])
    with pytest.raises(ValueError, match=r"Invalid shared: every trainable parameter of encoders\['image'\] is shared; "
                                         r"allowed: leave each modality at least one parameter of its own"):
        Balancer(model, encs, head="head", shared=["enc.image"])
    # one name, not a list of one: the same as the list
    one = Balancer(model, encs, head="head", shared="enc.audio.2")
    assert one.parameter_modality() == Balancer(model, encs, head="head", shared=["enc.audio.2"]).parameter_modality()
    tied = model.enc["audio"][2]
    assert one.parameter_modality() == Balancer(model, encs, head="head", shared=tied).parameter_modality()
    by_param = Balancer(model, encs, head="head", shared=[tied.weight, tied.bias]).parameter_modality()
    assert one.parameter_modality() == by_param
