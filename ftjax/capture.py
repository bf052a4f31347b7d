"""Which attention layers FlowTracer reads, and how they are reduced to one map.

Dims: B batch, T tokens, L layers.

FlowTracer aggregates attention as the mean over all heads and over the middle third of the
layers, [floor(L/3), floor(2L/3)) (paper ablation: middle layers are best, all-layer averaging
dilutes the signal); a cheaper option reads 5 evenly spaced layers of that range. The model
reduces each captured layer to its head mean inside the layer and keeps a running layer mean, so
the captured map costs O(B T^2) memory, never O(B L H T^2).
"""

from __future__ import annotations

import dataclasses

MODES = ("middle_third", "middle_five", "layers", "none")


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
    """mode: middle_third (default), middle_five, layers (explicit `layers`), none."""

    mode: str = "middle_third"
    layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown capture mode {self.mode!r}; known: {MODES}")
        if self.mode == "layers" and not self.layers:
            raise ValueError("capture mode 'layers' needs a non-empty `layers` tuple")
        if self.mode != "layers" and self.layers:
            raise ValueError(f"capture `layers` is only used with mode='layers', not {self.mode!r}")


NONE = CaptureSpec(mode="none")


def captured_layers(spec: CaptureSpec, num_layers: int) -> tuple[int, ...]:
    """The layer indices `spec` reads from a model with `num_layers` layers (sorted, unique)."""
    if spec.mode == "none":
        return ()
    if spec.mode == "layers":
        bad = [layer for layer in spec.layers if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"capture layers {bad} out of range for {num_layers} layers")
        return tuple(sorted(set(spec.layers)))
    start, stop = num_layers // 3, (2 * num_layers) // 3
    if stop <= start:  # fewer than 3 layers: the middle third is empty, read the middle layer
        start, stop = num_layers // 2, num_layers // 2 + 1
    middle = tuple(range(start, stop))
    if spec.mode == "middle_third" or len(middle) <= 5:
        return middle
    picks = {start + round(j * (len(middle) - 1) / 4) for j in range(5)}
    return tuple(sorted(picks))
