"""Export of adaptive MoE routing to transformers' MiniMax: top-p routing and a non-zero routing bias are refused
(transformers selects exactly num_experts_per_tok experts by probability), an all-zero bias exports exactly."""

import logging

import pytest
import torch

pytest.importorskip("transformers.models.minimax", reason="this transformers has no MiniMax model")

from minimax_gpt.interop.hf import config_to_hf, to_hf  # noqa: E402
from test_hf import ATOL, ids_for, max_diff, our_config, our_model  # noqa: E402


def test_top_p_routing_is_refused():
    with pytest.raises(ValueError, match="moe_top_p=0.7: transformers' MiniMax routes every token to exactly"):
        config_to_hf(our_config(moe_top_p=0.7, moe_top_k=3))


def test_non_zero_routing_bias_is_refused_and_zero_bias_exports_exactly(caplog):
    ours = our_model(moe_bias_update_rate=0.001)
    ids = ids_for(89)
    with caplog.at_level(logging.WARNING, logger="minimax_gpt.interop.hf"):
        hf = to_hf(ours, attn_implementation="eager")  # bias still all zero: exact
    assert "moe_bias_update_rate=0.001" in caplog.text  # the rate is training-only, named as not carried
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) < ATOL
        ours.blocks[2].mlp.routing_bias[1] = 0.25
    with pytest.raises(ValueError, match=r"routing bias \(moe_bias_update_rate\) is non-zero in layers \[2\] "
                                         r"\(largest \|bias\| 0.25\)"):
        to_hf(ours)
