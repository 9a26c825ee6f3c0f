"""The exact placement (CP-SAT): most instances first, then the seed's score; --explain; rebalance plans."""

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.sched import InstanceSpec
from services.scheduler.batch import place_all
from services.scheduler.cluster import NodeConfig
from services.scheduler.placement import Placer
from services.scheduler.planning import plan
from services.scheduler.rebalance import plan_rebalance
from services.scheduler.solver import solve
from tests.unit.test_placement_properties import check_hard_constraints, clusters, instance_sets, valid_specs

pytestmark = [pytest.mark.unit, pytest.mark.timeout(300)]


def spec(instance_id, ram_gb, **kw):
    return InstanceSpec(instance_id=instance_id, ram_gb=ram_gb, **kw)


@st.composite
def crowded(draw, max_nodes=5, max_instances=14):
    """Clusters asked for more than they hold, so greedy often falls short and the solver runs."""
    nodes, unavailable = draw(clusters(max_nodes=max_nodes))
    specs = valid_specs(draw(instance_sets([n.name for n in nodes], max_instances=max_instances)))
    return nodes, unavailable, specs


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=crowded())
def test_the_solver_never_breaks_a_hard_constraint_and_never_places_fewer_than_greedy(case):
    nodes, unavailable, specs = case
    greedy = place_all(Placer(nodes, unavailable=unavailable), specs, budget_s=0.0)
    exact = place_all(Placer(nodes, unavailable=unavailable), specs, budget_s=2.0)
    assert set(exact.placements) | set(exact.unplaced) == {s.instance_id for s in specs}
    assert not set(exact.placements) & set(exact.unplaced)
    check_hard_constraints(nodes, unavailable, specs, exact.placements)
    assert len(exact.placements) >= len(greedy.placements)
    assert exact.optimal or exact.method == "cp-sat"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=crowded())
def test_fast_path_and_solver_agree_when_everything_fits(case):
    nodes, unavailable, specs = case
    greedy = place_all(Placer(nodes, unavailable=unavailable), specs, budget_s=0.0)
    placer = Placer(nodes, unavailable=unavailable)
    placer.note_anti_affinity(specs)
    solved = solve(placer, specs, budget_s=5.0, score=False)
    assert solved is not None and solved.score_proven
    if not greedy.unplaced:  # the fast path placed everything: the solver must find that many too
        assert len(solved.where) == len(specs) and greedy.optimal and greedy.method == "greedy"
    if len(solved.where) == len(specs):  # everything fits: the full pipeline places everything
        assert not place_all(Placer(nodes, unavailable=unavailable), specs, budget_s=5.0).unplaced


def brute_force_most(nodes, unavailable, specs) -> int:
    names = [None, *(n.name for n in nodes)]
    best = 0
    for combo in itertools.product(names, repeat=len(specs)):
        placements = {s.instance_id: n for s, n in zip(specs, combo) if n is not None}
        if len(placements) <= best:
            continue
        try:
            check_hard_constraints(nodes, unavailable, specs, placements)
        except AssertionError:
            continue
        best = len(placements)
    return best


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_places_exactly_as_many_as_brute_force_allows(data):
    nodes, unavailable = data.draw(clusters(max_nodes=3))
    specs = valid_specs(data.draw(instance_sets([n.name for n in nodes], max_instances=5)))
    result = place_all(Placer(nodes, unavailable=unavailable), specs, budget_s=5.0)
    assert result.optimal
    assert len(result.placements) == brute_force_most(nodes, unavailable, specs)


def test_capacity_bound_batch_where_greedy_falls_short():
    # Greedy puts the 5 GB instance on the only GPU-free slot first; the solver packs all four.
    nodes = [NodeConfig(name="gpu", ram_gb=10.0, gpu=True, gpu_memory_gb=16.0, max_instances=2),
             NodeConfig(name="cpu", ram_gb=6.0, max_instances=2)]
    specs = [spec("big", 5.0, gpu_preferred=True), spec("g1", 4.0, gpu_required=True, gpu_memory_gb=8.0),
             spec("s1", 3.0), spec("s2", 3.0, gpu_preferred=True)]
    greedy = place_all(Placer(nodes), specs, budget_s=0.0)
    exact = place_all(Placer(nodes), specs)
    assert len(greedy.placements) < 4 and not greedy.optimal
    assert len(exact.placements) == 4 and exact.optimal and exact.method == "cp-sat"
    assert exact.placements["g1"] == "gpu"


def test_among_placements_of_the_most_the_seed_score_decides():
    # Both nodes can take the one instance; only the preferred node's bonus tells them apart.
    nodes = [NodeConfig(name="a", ram_gb=8.0, max_instances=1), NodeConfig(name="b", ram_gb=8.0, max_instances=1)]
    specs = [spec("x", 9.0), spec("y", 2.0, preferred_node="b")]  # x fits nowhere: the solver runs
    result = place_all(Placer(nodes), specs)
    assert result.method == "cp-sat" and result.placements == {"y": "b"} and result.score_optimal


def test_gangs_stay_all_or_nothing_under_the_solver():
    nodes = [NodeConfig(name="a", ram_gb=10.0, max_instances=3), NodeConfig(name="b", ram_gb=10.0, max_instances=3)]
    specs = [spec("s0", 6.0, group="g"), spec("s1", 6.0, group="g"), spec("s2", 6.0, group="g"),
             spec("solo1", 4.0), spec("solo2", 4.0)]
    result = place_all(Placer(nodes), specs)
    placed = set(result.placements)
    assert placed & {"s0", "s1", "s2"} in (set(), {"s0", "s1", "s2"})
    assert len(placed) == 2 and result.optimal  # the gang (18 GB on 20) cannot share a node pairwise
    assert "do not all fit at once" in result.unplaced["s0"] or "gang 'g'" in result.unplaced["s0"]


def test_explain_names_the_binding_constraint():
    nodes = [NodeConfig(name="gpu", ram_gb=16.0, gpu=True, gpu_memory_gb=8.0, max_instances=4),
             NodeConfig(name="cpu", ram_gb=64.0, max_instances=4)]
    running = {"hog": (spec("hog", 14.0, gpu_required=True), "gpu")}
    specs = [spec("late", 4.0, gpu_required=True), spec("apart", 1.0, gpu_required=True, anti_affinity=["hog"])]
    result = plan(nodes, specs, running=running, explain=True)
    assert result.placements == {}
    late, apart = result.explanations["late"], result.explanations["apart"]
    assert late.binding == "ram" and late.nodes["gpu"] == ["2.0 GB RAM free, needs 4"]
    assert late.nodes["cpu"] == ["no GPU"]  # one node each: what is full binds before what a node lacks
    assert apart.binding == "anti_affinity" and apart.nodes["gpu"] == ["holds hog (anti-affinity)"]
    assert "relaxing it alone would open 1 of 2 nodes" in apart.summary


def test_explain_a_gang_member_that_fits_alone():
    nodes = [NodeConfig(name="a", ram_gb=8.0, max_instances=4)]
    result = plan(nodes, [spec("m0", 2.0, group="pair"), spec("m1", 9.0, group="pair")], explain=True)
    assert result.explanations["m0"].binding == "gang" and result.explanations["m1"].binding == "ram"


def test_a_running_instance_naming_anti_affinity_keeps_the_newcomer_away():
    nodes = [NodeConfig(name="a", ram_gb=8.0), NodeConfig(name="b", ram_gb=8.0)]
    running = {"old": (spec("old", 1.0, anti_affinity=["new"]), "a")}
    result = plan(nodes, [spec("new", 1.0, preferred_node="a")], running=running)
    assert result.placements == {"new": "b"}


def test_rebalance_moves_running_instances_to_make_room_for_a_pending_one():
    nodes = [NodeConfig(name="big", ram_gb=16.0), NodeConfig(name="small", ram_gb=12.0)]
    movable = {"a": (spec("a", 6.0), "big"), "b": (spec("b", 6.0), "big")}
    result = plan_rebalance(nodes, movable, [spec("c", 12.0)])
    assert [(m.instance_id, m.from_node, m.to_node) for m in result.moves] == [
        ("a", "big", "small"), ("b", "big", "small"), ("c", "", "big")]
    assert (result.placed_before, result.placed_after) == (2, 3) and result.optimal


def test_rebalance_moves_nothing_for_no_gain_and_never_drops_a_running_instance():
    nodes = [NodeConfig(name="a", ram_gb=16.0, max_instances=1), NodeConfig(name="b", ram_gb=16.0, max_instances=1)]
    movable = {"x": (spec("x", 8.0), "a"), "y": (spec("y", 8.0), "b")}
    result = plan_rebalance(nodes, movable, [spec("z", 8.0)])  # z would fit only if x or y dropped out
    assert result.moves == [] and result.placed_after == 2


def test_rebalance_leaves_out_a_swap_it_cannot_order():
    # Each wants the other's node (preferred), and each node holds one: no new copy fits beside an old one.
    nodes = [NodeConfig(name="a", ram_gb=16.0, max_instances=1), NodeConfig(name="b", ram_gb=16.0, max_instances=1)]
    movable = {"x": (spec("x", 8.0, preferred_node="b"), "a"), "y": (spec("y", 8.0, preferred_node="a"), "b")}
    result = plan_rebalance(nodes, movable, [])
    assert result.moves == [] and set(result.blocked) == {"x", "y"}
    assert "no room for a second copy" in result.blocked["x"]


def test_rebalance_moves_to_the_preferred_node_when_it_has_room():
    nodes = [NodeConfig(name="a", ram_gb=16.0), NodeConfig(name="b", ram_gb=16.0)]
    result = plan_rebalance(nodes, {"x": (spec("x", 4.0, preferred_node="b"), "a")}, [])
    assert [(m.instance_id, m.to_node) for m in result.moves] == [("x", "b")]
    assert result.moves[0].score_gain == 10.0 and result.score_after > result.score_before
