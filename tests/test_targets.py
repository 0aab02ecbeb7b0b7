"""Targets as types (issue 24): one class per kind, built by ``Target(kind, ...)``, owning what differs by kind."""

import ast
import copy
import dataclasses
import pathlib
import pickle

import pytest
import torch

from vital_fast.optim.targets import (
    TARGET_KINDS,
    ChannelTarget,
    ClassTarget,
    DirectionTarget,
    NeuronTarget,
    Target,
    direction_target,
    parse_target,
    register_target_kind,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent / "vital_fast"


def test_each_kind_is_its_own_class():
    assert type(Target("class", 3)) is ClassTarget
    assert type(Target("channel", 3, "l")) is ChannelTarget
    assert type(Target("neuron", 3, "l", loc=(1, 2))) is NeuronTarget
    assert type(direction_target("l", torch.tensor([0.0, 1.0, 1.0]))) is DirectionTarget
    assert type(parse_target("channel:_blocks.10:4")) is ChannelTarget
    assert set(TARGET_KINDS) >= {"class", "channel", "direction", "neuron"}


def test_a_kind_the_class_does_not_have_is_refused():
    with pytest.raises(ValueError, match="target kind must be one of class, channel"):
        Target("layer", 3)
    with pytest.raises(ValueError, match="has kind 'channel'"):
        ChannelTarget("class", 3)


@pytest.mark.parametrize("t", [Target("class", 3), Target("channel", 3, "l"), Target("neuron", 3, "l", loc=(1, 2)),
                               direction_target("l", torch.tensor([0.0, 1.0, 2.0]), source="v")])
def test_copies_pickles_and_replacements_keep_the_class_and_the_key(t):
    for u in (copy.deepcopy(t), pickle.loads(pickle.dumps(t)), dataclasses.replace(t)):
        assert type(u) is type(t) and u == t and u.key == t.key and hash(u) == hash(t)
    assert Target("channel", 3, "l") != Target("neuron", 3, "l", loc=(0, 0))


def test_what_differs_by_kind_is_asked_of_the_target():
    c, n = Target("channel", 2, "l"), Target("neuron", 2, "l", loc=(3, 1))
    d = direction_target("l", torch.tensor([0.0, 0.5, 0.5]), source="v")
    k = Target("class", 7)
    assert [t.is_unit for t in (k, c, n, d)] == [False, True, True, True]
    assert [t.whole_channel for t in (k, c, n, d)] == [None, 2, None, None]
    assert c.unit_at(448, 224) == 2 and d.unit_at() is d
    assert n.unit_at(448, 224).loc == (7, 3)  # a neuron's location moves with the grid
    assert torch.equal(n.unit_vector(4), c.unit_vector(4))
    assert n.unit_identity() != c.unit_identity() and d.unit_identity()[1] == d.direction.digest
    with pytest.raises(ValueError, match="no unit vector"):
        k.unit_vector(4)
    with pytest.raises(ValueError, match="has 3 values but layer 'l' has 4 channels"):
        d.unit_vector(4)
    assert n.record() == {"loc": [3, 1]} and c.record() == {} and "direction" in d.record()


def test_a_new_kind_registers_and_parses():
    @register_target_kind
    class SideTarget(ChannelTarget):
        """A test kind: a channel written ``side:LAYER:C``."""

        KIND = "side"

        @classmethod
        def parse(cls, spec):
            _, layer, c = spec.split(":")
            return cls("side", int(c), layer)

        @property
        def key(self):
            return f"side:{self.layer}:{self.index}"

    try:
        t = parse_target("side:layer3:5")
        assert type(t) is SideTarget and t.key == "side:layer3:5" and t.whole_channel == 5
        assert type(Target("side", 1, "x")) is SideTarget
    finally:
        TARGET_KINDS.pop("side")
    with pytest.raises(ValueError, match="not a Target subclass"):
        register_target_kind(int)


def _kind_tests(path: pathlib.Path):
    """``X.kind == '...'``-style comparisons of a target's kind in a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "kind" and not (
                    isinstance(s.value, ast.Name) and s.value.id == "self") for s in sides):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def test_the_engine_the_sweep_and_the_cli_never_test_a_target_kind():
    bad = [hit for p in sorted(ROOT.rglob("*.py")) if p.name != "targets.py" for hit in _kind_tests(p)]
    assert not bad, "ask the target instead of testing its kind:\n" + "\n".join(bad)
