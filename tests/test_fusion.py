"""modality_param_groups and ConcatFusion."""

import pytest
import torch
from torch import nn

from masked_optim import ConcatFusion, MaskedMultiModalSGD, modality_param_groups, slice_logits
from tolerances import assert_close


def encoders():
    return {
        "audio": nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(8, 6)),
        "video": nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6)),
    }


def ids(params):
    return {id(p) for p in params}


def test_groups_cover_every_parameter_once():
    enc = encoders()
    head = nn.Linear(12, 3)
    groups = modality_param_groups(enc, shared=head, lr=0.5)
    assert [g["modality"] for g in groups] == ["audio", "video", None]
    assert ids(groups[0]["params"]) == ids(enc["audio"].parameters())
    assert ids(groups[2]["params"]) == ids(head.parameters())
    assert all(g["lr"] == 0.5 for g in groups) and all("masked" not in g for g in groups)
    MaskedMultiModalSGD(groups)  # accepted as is


def test_biases_and_norms_can_be_left_dense():
    enc = encoders()
    groups = modality_param_groups(enc, mask_biases_and_norms=False)
    by = {(g["modality"], g.get("masked", True)): g["params"] for g in groups}
    audio = enc["audio"]
    assert ids(by[("audio", True)]) == {id(audio[0].weight), id(audio[4].weight)}
    assert ids(by[("audio", False)]) == {id(audio[0].bias), id(audio[1].weight), id(audio[1].bias), id(audio[4].bias)}
    assert ids(by[("video", False)]) == {id(enc["video"][0].bias), id(enc["video"][1].weight), id(enc["video"][1].bias)}


def test_frozen_parameters_are_left_out_and_moduledict_accepted():
    enc = nn.ModuleDict(encoders())
    enc["video"][0].weight.requires_grad_(False)
    groups = modality_param_groups(enc)
    assert id(enc["video"][0].weight) not in ids(groups[1]["params"])


def test_a_parameter_in_two_places_is_rejected():
    shared = nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"parameter encoders\['a'\]\.weight \(shape \(3, 3\)\) belongs to both modality 'a' "
                                         r"and modality 'b'"):
        modality_param_groups({"a": shared, "b": shared})
    with pytest.raises(ValueError, match=r"a parameter of shape \(3, 3\) belongs to both modality 'a' and modality 'b'"):
        modality_param_groups({"a": [shared.weight], "b": [shared.weight]})  # bare tensors: no name to give
    with pytest.raises(ValueError, match=r"belongs to both modality 'a' and shared"):
        modality_param_groups({"a": shared}, shared=[shared])


def test_bad_encoders_are_rejected():
    with pytest.raises(ValueError, match=r"Invalid encoders: list; allowed: a non-empty dict"):
        modality_param_groups([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=r"Invalid encoders key: 3; allowed: a non-empty str"):
        modality_param_groups({3: nn.Linear(2, 2)})
    with pytest.raises(TypeError, match=r"Invalid shared: int"):
        modality_param_groups({"a": nn.Linear(2, 2)}, shared=5)


def test_concat_fusion_slices_sum_to_fused_logits():
    torch.manual_seed(0)
    head = ConcatFusion({"audio": 4, "video": 6}, num_classes=3)
    z = {"video": torch.randn(5, 6), "audio": torch.randn(5, 4)}  # order of the dict does not matter
    out = head(z)
    assert out.logits.shape == (5, 3) and list(out.modality_logits) == ["audio", "video"]
    assert_close(out.modality_logits["audio"] + out.modality_logits["video"], out.logits)
    w, b = head.fc.weight, head.fc.bias
    assert_close(out.modality_logits["audio"], z["audio"] @ w[:, :4].t() + b / 2)
    assert_close(out.modality_logits["video"], z["video"] @ w[:, 4:].t() + b / 2)


def test_slice_logits_of_a_plain_linear_head():
    torch.manual_seed(1)
    fc = nn.Linear(7, 2, bias=False)
    z = {"x": torch.randn(3, 3), "y": torch.randn(3, 4)}
    parts = slice_logits(fc, z)
    assert_close(parts["x"] + parts["y"], fc(torch.cat([z["x"], z["y"]], 1)))
    with pytest.raises(ValueError, match=r"widths \{'x': 3\} sum to 3; allowed: they must sum to head.in_features=7"):
        slice_logits(fc, {"x": z["x"]})


def test_concat_fusion_validation():
    with pytest.raises(ValueError, match=r"Invalid dims\['a'\]: 0; allowed: a positive int"):
        ConcatFusion({"a": 0}, 2)
    with pytest.raises(ValueError, match=r"Invalid num_classes: 0; allowed: a positive int"):
        ConcatFusion({"a": 2}, 0)
    head = ConcatFusion({"a": 2, "b": 2}, 2)
    with pytest.raises(ValueError, match=r"Invalid features: modalities \['a'\]; allowed: exactly \['a', 'b'\]"):
        head({"a": torch.zeros(1, 2)})


def test_slice_logits_casts_features_to_the_head_dtype_outside_autocast():
    head = torch.nn.Linear(7, 3)
    za, zb = torch.randn(5, 4), torch.randn(5, 3)
    out = slice_logits(head, {"a": za.bfloat16(), "b": zb.bfloat16()})
    ref = slice_logits(head, {"a": za.bfloat16().float(), "b": zb.bfloat16().float()})
    for m in out:
        assert out[m].dtype == torch.float32 and torch.equal(out[m], ref[m])


def test_slice_logits_checks_the_order_against_the_fused_logits():
    head = torch.nn.Linear(7, 3)
    za, zb = torch.randn(5, 4), torch.randn(5, 3)
    fused = head(torch.cat([za, zb], 1))
    slices = slice_logits(head, {"a": za, "b": zb}, fused=fused)
    torch.testing.assert_close(sum(slices.values()), fused)
    with pytest.raises(ValueError, match=r"Invalid features: the slices do not sum to the fused logits \(relative error .*\); "
                                         r"pass the features in the order the head concatenates them \(got \['b', 'a'\]\)"):
        slice_logits(head, {"b": zb, "a": za}, fused=fused)
    with pytest.raises(ValueError, match=r"Invalid fused: shape \(5, 2\); allowed: \(5, 3\)"):
        slice_logits(head, {"a": za, "b": zb}, fused=fused[:, :2])
