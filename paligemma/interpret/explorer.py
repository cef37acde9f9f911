"""The interactive attention explorer for a live kernel (ipywidgets): image, prompt, view, layer, head, token.

`render` draws one choice of the five views as a matplotlib figure; `AttentionExplorer` wires it to widgets and
captures each (image, prompt) pair once.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import PaliGemmaError
from .capture import AttentionMaps, attention_maps
from .plots import show_map
from .rollout import Reduction, rollout_rows

VIEWS = (
    "generated token -> image",
    "generated token -> image, through SigLIP",
    "prompt token -> image",
    "SigLIP: one patch's attention",
    "SigLIP: rollout",
)


def view_counts(maps: AttentionMaps, view: str) -> tuple[int, int, int]:
    """(layers, heads, items to choose from) for a view: the decoder's or SigLIP's sizes, and tokens or patches."""
    if view not in VIEWS:
        raise PaliGemmaError(f"unknown view {view!r}: choose from {', '.join(VIEWS)}")
    if view.startswith("SigLIP"):
        layers, heads = maps.vision.shape[:2]
        return layers, heads, maps.grid**2
    layers, heads = maps.generated_rows.shape[1:3]
    return layers, heads, len(maps.prompt_tokens) if view.startswith("prompt") else len(maps.token_ids)


def item_labels(maps: AttentionMaps, view: str) -> list[str]:
    """What the item chooser lists in a view: generated tokens, prompt tokens, or patches as (row, column)."""
    if view.startswith("SigLIP: one"):
        return [f"patch ({i // maps.grid}, {i % maps.grid})" for i in range(maps.grid**2)]
    if view.startswith("SigLIP"):
        return ["(all patches)"]
    tokens = maps.prompt_tokens if view.startswith("prompt") else maps.tokens
    return [f"{i}: {token!r}" for i, token in enumerate(tokens)]


def render(
    maps: AttentionMaps, view: str = VIEWS[0], layers: Reduction = -1, heads: Reduction = "mean", item: int = 0,
    style: str = "spotlight",
) -> Any:
    """The explorer's figure: the chosen map over the image, and beside it every head of the chosen layer
    (or of the last layer, when layers are aggregated)."""
    import matplotlib.pyplot as plt

    layer_count, head_count, items = view_counts(maps, view)
    if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < items:
        raise PaliGemmaError(f"item {item!r} is out of range for {view!r}: there are {items}")
    labels = item_labels(maps, view)
    label = labels[min(item, len(labels) - 1)]  # the rollout view has one label for all patches
    if view == VIEWS[0]:
        main, per_head = maps.token_map(item, layers, heads), maps.generated[item]
    elif view == VIEWS[1]:
        main = maps.token_map_through_vision(item, layers, heads)
        per_head = rollout_rows(maps.vision, maps.generated[item])  # every decoder head, carried back
    elif view == VIEWS[2]:
        main, per_head = maps.prompt_map(item, layers, heads), maps.prompt[item]
    elif view == VIEWS[3]:
        main, per_head = maps.patch_map(item, layers, heads), maps.vision[:, :, item]
    else:
        main, per_head = maps.rollout_map(heads=heads), None
    fig = plt.figure(figsize=(10, 4.2))
    ax = fig.add_axes((0.01, 0.04, 0.38, 0.8))
    show_map(main, maps.image, ax=ax, mark=item if view == VIEWS[3] else None, style=style)
    ax.set_title("\n".join(textwrap.wrap(f"{label} (layer {layers}, heads {heads})", 48)), fontsize=9)
    if per_head is not None:
        layer = layers if isinstance(layers, int) else -1
        if not -layer_count <= layer < layer_count:
            raise PaliGemmaError(f"layer {layer} is out of range: there are {layer_count}")
        columns = min(head_count, 4)
        rows = math.ceil(head_count / columns)
        for head in range(head_count):
            r, c = divmod(head, columns)
            width, height = 0.58 / columns, 0.84 / rows
            sub = fig.add_axes((0.41 + c * width, 0.92 - (r + 1) * height, width * 0.94, height * 0.8))
            show_map(per_head[layer, head], maps.image, ax=sub, title=f"layer {layer % layer_count}, head {head}",
                     mark=item if view == VIEWS[3] else None, style=style)
    fig.suptitle(f"{maps.prompt_text!r} -> {maps.text!r}", fontsize=10)
    return fig


class AttentionExplorer:
    """Pick an image, a prompt, a view, a layer, a head (or an aggregation), a token and a style; the map follows.

    Needs ipywidgets and a live kernel; each (image, prompt) pair is captured once and kept. Display it by
    leaving it as the last expression of a cell.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        images: Mapping[str, Any],
        prompts: Sequence[str],
        max_new_tokens: int = 8,
    ) -> None:
        import ipywidgets as widgets

        if not images or not prompts:
            raise PaliGemmaError("the explorer needs at least one image and one prompt")
        self.model, self.processor, self.images = model, processor, dict(images)
        self.max_new_tokens = max_new_tokens
        self._captured: dict[tuple[str, str], AttentionMaps] = {}
        self.figure: Any = None
        self.image = widgets.Dropdown(options=list(self.images), description="image")
        self.prompt = widgets.Combobox(options=list(prompts), value=prompts[0], description="prompt",
                                       ensure_option=False, continuous_update=False)
        self.view = widgets.Dropdown(options=list(VIEWS), description="view")
        self.layer = widgets.Dropdown(description="layer")
        self.head = widgets.Dropdown(description="head")
        self.item = widgets.Dropdown(description="token")
        self.style = widgets.Dropdown(options=["spotlight", "heat"], description="style")
        self.output = widgets.Output()
        self._updating = False
        self._refresh_choices()
        for control in (self.image, self.prompt, self.view):
            control.observe(self._on_input, names="value")
        for control in (self.layer, self.head, self.item, self.style):
            control.observe(self._on_choice, names="value")
        controls = widgets.VBox([self.image, self.prompt, self.view, self.layer, self.head, self.item, self.style])
        self.widget = widgets.HBox([controls, self.output])
        self.update()

    def maps(self) -> AttentionMaps:
        """The captured maps of the chosen image and prompt (captured on first use)."""
        key = (self.image.value, self.prompt.value)
        if key not in self._captured:
            self._captured[key] = attention_maps(self.model, self.processor, self.images[key[0]], key[1],
                                                 max_new_tokens=self.max_new_tokens)
        return self._captured[key]

    def _refresh_choices(self) -> None:
        """Layer, head and item lists follow the view (SigLIP and Gemma differ) and the captured tokens."""
        maps = self.maps()
        layers, heads, _ = view_counts(maps, self.view.value)
        self._updating = True
        try:
            keep = (self.layer.value, self.head.value)
            self.layer.options = [("last", -1), ("mean", "mean"), ("max", "max")] + [(str(i), i) for i in range(layers)]
            self.head.options = [("mean", "mean"), ("max", "max")] + [(str(i), i) for i in range(heads)]
            self.layer.value = keep[0] if keep[0] in [v for _, v in self.layer.options] else -1
            self.head.value = keep[1] if keep[1] in [v for _, v in self.head.options] else "mean"
            labels = item_labels(maps, self.view.value)
            self.item.options = [(label, i) for i, label in enumerate(labels)]
            self.item.value = 0
            self.item.description = "patch" if self.view.value.startswith("SigLIP") else "token"
        finally:
            self._updating = False

    def _on_input(self, _change: Any) -> None:
        self._refresh_choices()
        self.update()

    def _on_choice(self, _change: Any) -> None:
        if not self._updating:
            self.update()

    def update(self) -> None:
        """Redraw the figure for the current choices."""
        import matplotlib.pyplot as plt

        figure = render(self.maps(), self.view.value, self.layer.value, self.head.value, self.item.value,
                        self.style.value)
        self.figure = figure
        self.output.clear_output(wait=True)
        with self.output:
            from IPython.display import display

            display(figure)
        plt.close(figure)  # shown once, inside the output area, not again by the inline backend

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
