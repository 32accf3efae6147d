"""Few-shot episode sampling and the ProtoNet / SimpleShot heads."""

import numpy as np
import pytest
import torch

from fwdgrad.data import (
    accuracy,
    episodes,
    protonet_logits,
    prototypes,
    sample_episode,
    simpleshot_logits,
    simpleshot_transform,
)

LABELS = np.repeat(np.arange(12), 20)


def test_episode_shapes_labels_and_disjoint_indices():
    ep = sample_episode(LABELS, n_way=5, k_shot=3, n_query=4, rng=np.random.default_rng(0))
    assert ep.support.shape == (15,) and ep.query.shape == (20,)
    assert ep.support_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert ep.query_labels.tolist() == sorted(ep.query_labels.tolist()) and ep.query_labels.max() == 4
    assert not set(ep.support.tolist()) & set(ep.query.tolist())
    assert len(set(ep.classes.tolist())) == 5
    # every index's true class is the one its episode label points at
    for idx, lab in zip(torch.cat([ep.support, ep.query]), torch.cat([ep.support_labels, ep.query_labels])):
        assert LABELS[idx] == ep.classes[lab]


def test_episodes_use_only_held_out_classes_and_are_seeded():
    held_out = [7, 8, 9, 10, 11]
    a = list(episodes(LABELS, 4, n_way=3, k_shot=1, n_query=2, seed=5, classes=held_out))
    b = list(episodes(LABELS, 4, n_way=3, k_shot=1, n_query=2, seed=5, classes=held_out))
    c = list(episodes(LABELS, 4, n_way=3, k_shot=1, n_query=2, seed=6, classes=held_out))
    assert all(set(e.classes.tolist()) <= set(held_out) for e in a)
    assert all(torch.equal(x.query, y.query) for x, y in zip(a, b))
    assert not all(torch.equal(x.query, y.query) for x, y in zip(a, c))


def test_too_few_classes_is_a_value_error():
    with pytest.raises(ValueError, match="5-way"):
        sample_episode(LABELS, 5, 1, 1, np.random.default_rng(0), classes=[0, 1, 2])
    with pytest.raises(ValueError, match="only 0 of 12"):
        sample_episode(LABELS, 2, 15, 10, np.random.default_rng(0))


def _clusters(n_way=5, per_class=10, dim=16, spread=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_way, dim, generator=gen) * 5
    labels = torch.arange(n_way).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=gen), labels


def test_protonet_is_perfect_on_separated_clusters():
    emb, labels = _clusters()
    ep = sample_episode(labels, 5, 2, 5, np.random.default_rng(1))
    protos = prototypes(emb[ep.support], ep.support_labels, 5)
    assert protos.shape == (5, 16)
    logits = protonet_logits(emb[ep.query], protos)
    assert logits.shape == (25, 5) and bool((logits <= 0).all())
    assert accuracy(logits, ep.query_labels) == 1.0
    shuffled = ep.query_labels[torch.randperm(25, generator=torch.Generator().manual_seed(0))]
    assert accuracy(logits, shuffled) < 1.0


def test_prototype_is_the_support_mean():
    support = torch.tensor([[0.0, 0.0], [2.0, 4.0], [10.0, 10.0]])
    protos = prototypes(support, torch.tensor([0, 0, 1]), 2)
    assert torch.allclose(protos, torch.tensor([[1.0, 2.0], [10.0, 10.0]]))
    with pytest.raises(ValueError, match="support example"):
        prototypes(support, torch.tensor([0, 0, 0]), 2)


def test_simpleshot_centres_normalises_and_classifies():
    emb, labels = _clusters(seed=2)
    base_mean = emb.mean(0)
    transformed = simpleshot_transform(emb, base_mean)
    assert torch.allclose(transformed.norm(dim=1), torch.ones(len(emb)), atol=1e-5)
    ep = sample_episode(labels, 5, 1, 5, np.random.default_rng(2))
    logits = simpleshot_logits(emb[ep.support], ep.support_labels, emb[ep.query], base_mean, 5)
    assert accuracy(logits, ep.query_labels) == 1.0
