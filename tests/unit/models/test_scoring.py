"""Image-level score (METHODS.md section 2) against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.prompts import PROMPT_SETS, object_name
from pipeline.models.scoring import anomaly_probability, build_classifier, class_similarities


def test_winclip_ensemble_sizes():
    normal, anomalous = PROMPT_SETS["winclip"].sentences("bottle")
    assert (len(normal), len(anomalous)) == (154, 88)
    assert "a cropped photo of the flawless bottle" in normal
    assert "a photo of a bottle with defect for anomaly detection" in anomalous
    n2, a2 = PROMPT_SETS["winclip_anomalib"].sentences("bottle")
    assert (len(n2), len(a2)) == (147, 84)
    assert all(s.endswith(".") for s in n2 + a2)
    assert n2.count("a jpeg corrupted photo of the bottle.") == 2
    assert not any(s.startswith("a cropped photo of a ") for s in n2)


@pytest.mark.parametrize(
    "category,policy,expected",
    [("pcb1", "mapping", "printed circuit board"), ("metal_nut", "underscore", "metal nut"),
     ("metal_nut", "raw", "metal_nut"), ("chewinggum", "mapping", "chewing gum"), ("screw", "mapping", "screw")],
)
def test_object_names(category, policy, expected):
    assert object_name(category, policy) == expected


def test_object_name_override_and_bad_policy():
    assert object_name("pcb1", "mapping", {"pcb1": "board"}) == "board"
    with pytest.raises(ValueError, match="policy"):
        object_name("x", "bogus")


def _hand_prob(f, tn, ta, tau):
    cn = float(f @ tn / (f.norm() * tn.norm()))
    ca = float(f @ ta / (f.norm() * ta.norm()))
    return math.exp(ca / tau) / (math.exp(cn / tau) + math.exp(ca / tau))


def test_mean_raw_and_renorm_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(5, 8, generator=g) * torch.rand(5, 1, generator=g) * 3
    anomalous = torch.randn(3, 8, generator=g) * 2
    f = torch.randn(2, 8, generator=g)
    for agg, tn, ta in [
        ("mean_raw", normal.mean(0), anomalous.mean(0)),
        ("mean_norm_renorm", F.normalize(normal, dim=-1).mean(0), F.normalize(anomalous, dim=-1).mean(0)),
    ]:
        clf = build_classifier(normal, anomalous, agg)
        probs = anomaly_probability(f, clf, 0.07)
        for i in range(2):
            assert probs[i].item() == pytest.approx(_hand_prob(f[i], tn, ta, 0.07), abs=1e-6)
    # mean_raw and mean_norm_renorm point in different directions when norms differ
    a = anomaly_probability(f, build_classifier(normal, anomalous, "mean_raw"), 0.07)
    b = anomaly_probability(f, build_classifier(normal, anomalous, "mean_norm_renorm"), 0.07)
    assert not torch.allclose(a, b)


def test_mean_norm_uses_unrenormalised_mean():
    normal = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # mean of unit vectors has norm 0.707
    anomalous = torch.tensor([[-1.0, 0.0]])
    f = torch.tensor([[1.0, 1.0]])
    sims = class_similarities(f, build_classifier(normal, anomalous, "mean_norm"))
    fn = f / f.norm()
    assert sims[0, 0].item() == pytest.approx(float(fn @ torch.tensor([0.5, 0.5])), abs=1e-6)
    assert sims[0, 1].item() == pytest.approx(float(fn @ torch.tensor([-1.0, 0.0])), abs=1e-6)


def test_per_prompt_averages_cosines():
    normal = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    anomalous = torch.tensor([[-1.0, 0.0], [0.0, -3.0]])
    f = torch.tensor([[3.0, 4.0]])
    sims = class_similarities(f, build_classifier(normal, anomalous, "per_prompt"))
    assert sims[0, 0].item() == pytest.approx((0.6 + 0.8) / 2, abs=1e-6)
    assert sims[0, 1].item() == pytest.approx((-0.6 - 0.8) / 2, abs=1e-6)
    p = anomaly_probability(f, build_classifier(normal, anomalous, "per_prompt"), 0.01)
    assert p.item() == pytest.approx(1 / (1 + math.exp(1.4 / 0.01)), rel=1e-4)


def test_unknown_aggregation():
    with pytest.raises(ValueError, match="aggregation"):
        build_classifier(torch.ones(1, 2), torch.ones(1, 2), "median")
