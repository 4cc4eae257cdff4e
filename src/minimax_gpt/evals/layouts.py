"""Layer layouts compared by the recall benchmark, as data: a name -> the model's `layer_types`.

    softmax       every layer softmax attention
    lightning     every layer lightning attention
    hybrid-7-1    MiniMax-01: 7 lightning then 1 softmax, repeated (n_layer a multiple of 8)
    hybrid-3-1    3 lightning then 1 softmax, repeated (n_layer a multiple of 4)

Built in but not run by default:

    sparse-7-1    7 lightning then 1 "sparse" (MoBA block-sparse softmax), repeated
    NAME-conv     the layout NAME with a short convolution (kernel CONV_KERNEL) in its lightning layers
                  (MiniMaxConfig.short_conv), e.g. hybrid-7-1-conv, lightning-conv

Any other layout is a list of "lightning" / "softmax" / "sparse" of length n_layer, named by the user (its short
convolution, if any, set by name in the budget's [short_conv] table).
"""

from __future__ import annotations

from minimax_gpt.config import LAYER_TYPES

DEFAULT_LAYOUTS = ("softmax", "lightning", "hybrid-7-1", "hybrid-3-1")
BUILT_IN_LAYOUTS = (*DEFAULT_LAYOUTS, "sparse-7-1")  # each also as NAME-conv
CONV_KERNEL = 4  # the short convolution of the NAME-conv layouts (Zoology's and Mamba's kernel size)


def periodic_layout(n_layer: int, period: int) -> list[str]:
    """(period - 1) lightning layers then one softmax layer, repeated; the softmax layer last in each period."""
    if n_layer % period:
        raise ValueError(f"a {period - 1}:1 hybrid needs n_layer to be a multiple of {period}, got {n_layer}")
    return ["softmax" if (i + 1) % period == 0 else "lightning" for i in range(n_layer)]


def layout_types(name: str, n_layer: int) -> list[str]:
    """The layer_types of a named built-in layout at depth n_layer."""
    if name.endswith("-conv"):
        return layout_types(name.removesuffix("-conv"), n_layer)
    if name == "softmax":
        return ["softmax"] * n_layer
    if name == "lightning":
        return ["lightning"] * n_layer
    if name == "hybrid-7-1":
        return periodic_layout(n_layer, 8)
    if name == "hybrid-3-1":
        return periodic_layout(n_layer, 4)
    if name == "sparse-7-1":
        return ["sparse" if t == "softmax" else t for t in periodic_layout(n_layer, 8)]
    raise ValueError(f"unknown layout {name!r}; built in: {', '.join(BUILT_IN_LAYOUTS)}, and NAME-conv for any of "
                     f"them with lightning layers (or give its layer types, e.g. --layout "
                     f"mine=lightning,softmax,...)")


def is_built_in(name: str) -> bool:
    return name.removesuffix("-conv") in BUILT_IN_LAYOUTS


def layout_short_conv(name: str) -> int:
    """The short-convolution kernel of a built-in layout: CONV_KERNEL for the NAME-conv layouts, else 0 (none)."""
    return CONV_KERNEL if name.endswith("-conv") else 0


def check_layout(name: str, types: list[str], n_layer: int) -> list[str]:
    """A user's layout, checked: n_layer entries, each a known layer type."""
    types = list(types)
    if len(types) != n_layer:
        raise ValueError(f"layout {name!r} has {len(types)} layer types but the benchmark's n_layer is {n_layer}")
    for t in types:
        if t not in LAYER_TYPES:
            raise ValueError(f"layout {name!r}: layer type {t!r} is not one of {', '.join(LAYER_TYPES)}")
    return types
