"""compress/select/paths.py: lmmse-selected kept channels for any searched count, and the analytical error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfp_deploy.analysis import analyze
from dfp_deploy.compress.select.lmmse import select_plan
from dfp_deploy.compress.select.paths import LmmseSelector
from dfp_deploy.core.errors import InputError
from dfp_deploy.search.space import build_space
from _helpers import Deep, example

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    model = Deep()
    analysis = analyze(model, example())
    space = build_space(model, analysis, example(), min_keep=0.2, round_to=2)
    choices = {name: space.choices(g) for g, name in enumerate(space.groups)}
    return model, analysis, space, LmmseSelector(model, analysis, choices)


def test_plan_keeps_the_searched_counts_and_matches_select_plan(setup):
    model, analysis, space, selector = setup
    kept = [space.snap(g, 0.5) for g in range(space.size)]
    plan = selector.plan(kept)
    assert [len(plan.keep[g]) for g in space.groups] == kept
    # the same counts from prune ratios (what the search's evaluate receives)
    assert selector.plan(space.ratios(kept)).keep == plan.keep
    reference, _ = select_plan(model, analysis, ratio=0.5, budget="uniform", round_to=2,
                               groups=list(space.groups))
    for g in space.groups:
        assert plan.keep[g] == reference.keep[g]


def test_full_counts_prune_nothing_and_error_grows_as_channels_go(setup):
    _, _, space, selector = setup
    assert selector.plan(list(space.channels)).keep == {}
    assert selector.predicted_error(list(space.channels)) == 0.0
    for g in range(space.size):
        errors = [selector.errors[g][int(k)] for k in space.choices(g)]  # ascending counts
        assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))
        sets = [set(selector.paths[g][int(k)]) for k in space.choices(g)]
        assert all(small <= big for small, big in zip(sets, sets[1:]))  # nested: one elimination path
    low = [space.min_kept[g] for g in range(space.size)]
    assert selector.predicted_error(low) > selector.predicted_error([space.snap(g, 0.7) for g in range(space.size)])


def test_counts_outside_the_space_are_input_errors(setup):
    _, _, space, selector = setup
    with pytest.raises(InputError):
        selector.plan([1] * space.size)  # below min_keep / not a multiple of round_to
    with pytest.raises(InputError):
        selector.plan([4])
    with pytest.raises(InputError):
        selector.plan({"nope": 0.5})
