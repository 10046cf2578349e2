"""Policies are frozen settings, and specs/configs map them to text and back without loss."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from atm_lightning.merge import (
    ATM,
    EViT,
    NoMerge,
    ToMe,
    from_config,
    from_spec,
    make_merger,
    to_config,
    to_spec,
)
from atm_lightning.merge.specs import from_config_file

POLICIES = [
    NoMerge(),
    ToMe(r=13),
    ToMe(r=[0, 1, 2], prop_attn=False),
    ATM(alpha=0.98, beta=0.018, theta_min=0.8, split_layer=12, batch_rule="min"),
    EViT(keep_rate=0.5, prune_layers=[7, 4], fuse_token=False),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: to_spec(p))
def test_spec_and_config_read_back_the_same_policy(policy) -> None:
    assert from_spec(to_spec(policy)) == policy
    assert from_config(to_config(policy)) == policy
    assert pickle.loads(pickle.dumps(policy)) == policy
    assert to_config(policy)["class_path"] == f"atm_lightning.merge.{type(policy).__name__}"


def test_policies_are_frozen_and_changed_by_replace() -> None:
    atm = ATM(theta_min=0.8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        atm.trace_source = True
    tracing = dataclasses.replace(atm, trace_source=True)
    assert tracing.trace_source and not atm.trace_source
    assert tracing.params() == atm.params()  # tracing changes what is recorded, not what is computed
    with pytest.raises(ValueError, match="beta must be >= 0"):
        dataclasses.replace(atm, beta=-1.0)  # replace validates like the constructor


def test_params_list_own_settings_first_as_plain_data() -> None:
    shared = {"prop_attn": True, "rerun_margin": 0.0, "last_block_prefix_only": False}
    assert ToMe(r=[1, 2]).params() == {"method": "tome", "r": [1, 2], **shared}
    assert list(EViT().params()) == ["method", "keep_rate", "prune_layers", "fuse_token", *shared]
    assert EViT(prune_layers=[10, 4, 4]).prune_layers == (4, 10)
    assert hash(ToMe(r=[1, 2])) == hash(ToMe(r=(1, 2)))


def test_specs_read_aliases_lists_and_quote_mistakes() -> None:
    assert from_spec("dense") == NoMerge() == make_merger("none")
    assert from_spec("ATM:batch_rule=min,theta_min=0.7").batch_rule == "min"
    assert from_spec("tome:r=[1,2],prop_attn=false") == ToMe(r=(1, 2), prop_attn=False)
    with pytest.raises(ValueError, match=r"bad settings in 'tome:q=1'.*Valid settings: \['r', 'prop_attn'"):
        from_spec("tome:q=1")
    with pytest.raises(ValueError, match="unknown method 'tame'"):
        from_spec("tame:r=3")


def test_config_files_give_their_merger(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  merger:\n    class_path: ToMe\n    init_args:\n      r: 4\n")
    assert from_config_file(config) == ToMe(r=4)
    config.write_text("model:\n  merger:\n    class_path: torch.nn.Linear\n")
    with pytest.raises(ValueError, match="'torch.nn.Linear' is not one of"):
        from_config_file(config)


def test_selection_sees_the_context_it_needs() -> None:
    """A policy chooses from the block's context; ToMe's count is capped at half the tokens, and a
    padded batch's rows that are not real are never chosen."""
    from atm_lightning.merge import MatchContext, alternating_split, best_matches, key_features, padding_mask

    size = torch.ones(2, 9)
    size[1, 5:] = 0  # image 1 is padded
    neg = padding_mask(torch.log(size)[:, None, None], True)
    split = alternating_split(9, 1, size.device, neg[:, None, 1::2])
    rows, cols = split.take(key_features(torch.randn(2, 1, 9, 4), per_head=False)[0])
    matches = best_matches(rows, cols, 1.0, split.col_mask)
    context = MatchContext(layer=0, split=split, matches=matches, size=size, free=torch.tensor([8, 4]))
    chosen, merges = ToMe(r=3).select(context)
    assert chosen.sum(1).tolist() == [3, 2] and merges is None
    assert not (chosen & ~context.real_rows()).any()
    uniform = MatchContext(layer=0, split=split, matches=matches, size=torch.ones(2, 9), free=8)
    chosen, merges = ToMe(r=3).select(uniform)
    assert chosen.sum(1).tolist() == [3, 3] and merges == 3  # one count the host knows: no sync
