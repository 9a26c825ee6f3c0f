"""Properties over random clusters and instance sets (hypothesis)."""

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.sched import InstanceSpec
from services.scheduler.batch import place_all
from services.scheduler.cluster import NodeConfig
from services.scheduler.placement import Placer

pytestmark = pytest.mark.unit


@st.composite
def clusters(draw, max_nodes=6):
    n = draw(st.integers(1, max_nodes))
    nodes = []
    for i in range(n):
        ram = draw(st.sampled_from([4.0, 8.0, 16.0, 64.0]))
        gpu = draw(st.booleans())
        nodes.append(NodeConfig(name=f"node{i}", ram_gb=ram, gpu=gpu, gpu_memory_gb=draw(st.sampled_from([8.0, 24.0])) if gpu else 0.0,
                                gpu_count=draw(st.sampled_from([0, 1, 2])) if gpu else 0,  # 0: not known
                                max_instances=draw(st.integers(0, 4)), reserved_ram_gb=draw(st.sampled_from([0.0, 1.0]))))
    unavailable = draw(st.sets(st.sampled_from([n.name for n in nodes])))
    return nodes, unavailable


@st.composite
def instance_sets(draw, node_names, max_instances=8):
    count = draw(st.integers(1, max_instances))
    ids = [f"inst{i}" for i in range(count)]
    specs = []
    for iid in ids:
        specs.append(InstanceSpec(
            instance_id=iid, ram_gb=draw(st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0, 12.0])),
            gpu_required=draw(st.booleans()), gpu_memory_gb=draw(st.sampled_from([0.0, 0.0, 4.0, 16.0])),
            gpus=draw(st.sampled_from([0, 0, 1, 2])),
            anti_affinity=draw(st.lists(st.sampled_from(ids), max_size=2, unique=True)),
            affinity=draw(st.lists(st.sampled_from(ids), max_size=1)),
            preferred_node=draw(st.sampled_from(["", *node_names])),
            group=draw(st.sampled_from(["", "", "", "g1"])),
        ))
    return specs


def check_hard_constraints(nodes, unavailable, specs, placements):
    by_id = {s.instance_id: s for s in specs}
    for node in nodes:
        here = [by_id[i] for i, n in placements.items() if n == node.name]
        if not here:
            continue
        assert node.name not in unavailable
        assert len(here) <= node.max_instances
        assert sum(s.ram_gb for s in here) <= node.ram_gb - node.reserved_ram_gb + 1e-9
        assert sum(s.gpu_memory_gb for s in here) <= node.gpu_memory_gb + 1e-9
        assert node.gpu or not any(s.gpu_required or s.gpu_memory_gb or s.gpus for s in here)
        assert not node.gpu_count or sum(s.gpus for s in here) <= node.gpu_count, "more GPUs held than the node has"
        ids = {s.instance_id for s in here}
        for s in here:
            assert not (set(s.anti_affinity) - {s.instance_id}) & ids, "anti-affinity broken"
    for group in {s.group for s in specs if s.group}:
        members = [s.instance_id for s in specs if s.group == group]
        placed = [m for m in members if m in placements]
        assert len(placed) in (0, len(members)), "gang partly placed"


def valid_specs(specs):
    # An instance anti-affine with itself can never be placed; keep the generator honest.
    return [InstanceSpec(**{**{f: getattr(s, f) for f in s.__struct_fields__},
                            "anti_affinity": [a for a in s.anti_affinity if a != s.instance_id]}) for s in specs]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_placement_breaks_a_hard_constraint(data):
    nodes, unavailable = data.draw(clusters())
    specs = valid_specs(data.draw(instance_sets([n.name for n in nodes])))
    result = place_all(Placer(nodes, unavailable=unavailable), specs)
    assert set(result.placements) | set(result.unplaced) == {s.instance_id for s in specs}
    assert not set(result.placements) & set(result.unplaced)
    check_hard_constraints(nodes, unavailable, specs, result.placements)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_batch_placement_is_deterministic_whatever_the_input_order(data):
    nodes, unavailable = data.draw(clusters())
    specs = valid_specs(data.draw(instance_sets([n.name for n in nodes])))
    first = place_all(Placer(nodes, unavailable=unavailable), specs)
    shuffled = data.draw(st.permutations(specs))
    again = place_all(Placer(list(reversed(nodes)), unavailable=unavailable), shuffled)
    assert first.placements == again.placements and first.unplaced == again.unplaced


def exhaustive_all_placeable(nodes, unavailable, specs) -> bool:
    names = [n.name for n in nodes]
    for combo in itertools.product(names, repeat=len(specs)):
        try:
            check_hard_constraints(nodes, unavailable, specs, dict(zip((s.instance_id for s in specs), combo)))
            return True
        except AssertionError:
            continue
    return False


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_never_leaves_unplaced_what_some_order_could_place(data):
    nodes, unavailable = data.draw(clusters(max_nodes=3))
    specs = [InstanceSpec(**{**{f: getattr(s, f) for f in s.__struct_fields__}, "group": ""})
             for s in valid_specs(data.draw(instance_sets([n.name for n in nodes], max_instances=5)))]
    result = place_all(Placer(nodes, unavailable=unavailable), specs)
    if exhaustive_all_placeable(nodes, unavailable, specs):
        assert not result.unplaced, result.unplaced
