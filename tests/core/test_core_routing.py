"""Expert routing: the top-k-mass rule, its config table and its errors (pure, no broker)."""

from __future__ import annotations

import pytest

from shared.config import load_config
from shared.errors import ConfigError
from shared.routing import Expert, ExpertRouter, parse_experts


def test_parse_keeps_order_and_classes() -> None:
    experts = parse_experts(" vehicles=0,1,8,9 ; animals=2,3,4,5,6,7;")
    assert [e.model_id for e in experts] == ["vehicles", "animals"]
    assert experts[0].classes == frozenset({0, 1, 8, 9}) and experts[1].classes == frozenset(range(2, 8))
    assert parse_experts("") == () and parse_experts(" ; ") == ()


@pytest.mark.parametrize("text, match", [
    ("vehicles", "MODEL_ID=C"),
    ("=1,2", "MODEL_ID=C"),
    ("a=1,x", "integers"),
    ("a=", "no classes"),
    ("a=1; a=2", "twice"),
    ("a b=1", "may only contain"),
    ("a=-1", "≥ 0"),
])
def test_parse_rejects_malformed_tables(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_experts(text)


def test_route_picks_the_expert_with_the_most_top_k_mass() -> None:
    router = ExpertRouter(parse_experts("vehicles=0,1,8,9; animals=2,3,4,5,6,7"), fallback="general", top_k=3)
    # top-1 is a vehicle, but the animals hold more of the top-3 mass
    assert router.route((0, 3, 5, 1), (0.4, 0.35, 0.2, 0.05)) == "animals"
    assert router.route((8, 3, 9), (0.3, 0.3, 0.3)) == "vehicles"
    # only the top-k entries count: with k = 3 the 0.05 on class 1 is ignored
    assert router.route((3, 0, 9, 1), (0.3, 0.2, 0.1, 0.4)) == "vehicles"
    # a tie goes to the expert listed first
    assert router.route((0, 3), (0.5, 0.5)) == "vehicles"
    assert router.route((3, 0), (0.5, 0.5)) == "vehicles"


def test_route_falls_back_to_the_general_server() -> None:
    router = ExpertRouter(parse_experts("a=0,1; b=2,3"), fallback="general")
    assert router.route((7, 8, 9), (0.5, 0.3, 0.2)) == "general"  # no expert covers any of the mass
    assert ExpertRouter((), fallback="general").route((0,), (1.0,)) == "general"
    assert router.model_ids == ("a", "b", "general")
    with pytest.raises(ValueError, match="length"):
        router.route((0, 1), (1.0,))


def test_min_share_sends_torn_images_to_the_general_server() -> None:
    experts = parse_experts("vehicles=0,1,8,9; animals=2,3,4,5,6,7")
    strict = ExpertRouter(experts, fallback="general", min_share=0.9)
    assert strict.route((0, 1, 3), (0.6, 0.35, 0.05)) == "vehicles"  # 0.95 of the mass
    assert strict.route((0, 3, 1), (0.5, 0.3, 0.2)) == "general"  # 0.7: torn between experts
    # the share is of the top-k mass, not of 1: probabilities need not sum to 1 over the top-k
    assert strict.route((0, 3), (0.18, 0.02)) == "vehicles"
    assert ExpertRouter(experts, fallback="general").route((0, 3, 1), (0.5, 0.3, 0.2)) == "vehicles"
    with pytest.raises(ConfigError, match="min_share"):
        ExpertRouter(experts, fallback="general", min_share=1.5)


def test_expert_and_router_validate_themselves() -> None:
    assert Expert("x", frozenset({1, 2})).mass((1, 5, 2), (0.5, 0.3, 0.1)) == pytest.approx(0.6)
    with pytest.raises(ConfigError, match="top_k"):
        ExpertRouter((), fallback="general", top_k=0)
    with pytest.raises(ConfigError, match="may only contain"):
        ExpertRouter((), fallback="bad/topic")


def test_routing_config_section_is_closed_and_validated() -> None:
    cfg = load_config(overrides={"routing": {"experts": "a=0,1; b=2", "top_k": 3}}, environ={})
    assert cfg.routing.top_k == 3 and [e.model_id for e in parse_experts(cfg.routing.experts)] == ["a", "b"]
    assert load_config(environ={"PATCHCAST_ROUTING__EXPERTS": "v=0,1"}).routing.experts == "v=0,1"
    with pytest.raises(ConfigError, match="twice"):
        load_config(overrides={"routing": {"experts": "a=0; a=1"}}, environ={})
    with pytest.raises(ConfigError, match="top_k"):
        load_config(overrides={"routing": {"top_k": 6}}, environ={})
    with pytest.raises(ConfigError, match="min_share"):
        load_config(overrides={"routing": {"min_share": -0.1}}, environ={})
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(overrides={"routing": {"expert": "a=0"}}, environ={})
