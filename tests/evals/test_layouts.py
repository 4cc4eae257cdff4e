"""Built-in layouts as data, and the checks on a user's."""

import pytest

from minimax_gpt.evals.layouts import CONV_KERNEL, check_layout, layout_short_conv, layout_types

L, S = "lightning", "softmax"


def test_built_in_layouts_at_depth_8():
    assert layout_types("softmax", 8) == [S] * 8
    assert layout_types("lightning", 8) == [L] * 8
    assert layout_types("hybrid-7-1", 8) == [L] * 7 + [S]
    assert layout_types("hybrid-3-1", 8) == [L, L, L, S] * 2
    assert layout_types("sparse-7-1", 16) == ([L] * 7 + ["sparse"]) * 2


def test_conv_layouts_are_the_base_layout_with_a_short_convolution():
    assert layout_types("hybrid-7-1-conv", 8) == [L] * 7 + [S]
    assert layout_types("lightning-conv", 8) == [L] * 8
    assert CONV_KERNEL == 4
    assert [layout_short_conv(n) for n in ("hybrid-7-1-conv", "lightning-conv", "hybrid-7-1", "softmax")] == \
        [4, 4, 0, 0]


def test_bad_layouts_are_named():
    with pytest.raises(ValueError, match="multiple of 8"):
        layout_types("hybrid-7-1", 4)
    with pytest.raises(ValueError, match="unknown layout 'mamba'"):
        layout_types("mamba", 4)
    with pytest.raises(ValueError, match="layout 'x' has 1 layer types but the benchmark's n_layer is 2"):
        check_layout("x", [L], 2)
    with pytest.raises(ValueError, match="layer type 'mamba' is not one of"):
        check_layout("x", [L, "mamba"], 2)
