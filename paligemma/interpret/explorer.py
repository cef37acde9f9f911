"""Your own prompts in the attention explorer, with a live kernel: pick an image, type a prompt, and the viewer follows.

The viewer itself (`viewer`) needs no kernel and shows precomputed maps; this widget adds what only a kernel can do,
running the model on a new image and prompt. Each (image, prompt) pair is captured once and kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import PaliGemmaError
from .capture import AttentionMaps, attention_maps
from .export import export_attention
from .viewer import AttentionViewer


class AttentionExplorer:
    """An image chooser and a prompt box (ipywidgets) above the attention viewer of the chosen pair.

    Display it by leaving it as the last expression of a cell. `viewer` is the viewer on show.
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
        self.viewer: AttentionViewer | None = None
        self.image = widgets.Dropdown(options=list(self.images), description="image")
        self.prompt = widgets.Combobox(options=list(prompts), value=prompts[0], description="prompt",
                                       ensure_option=False, continuous_update=False)
        self.output = widgets.Output()
        for control in (self.image, self.prompt):
            control.observe(lambda _change: self.update(), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.image, self.prompt]), self.output])
        self.update()

    def maps(self) -> AttentionMaps:
        """The captured maps of the chosen image and prompt (captured on first use)."""
        key = (self.image.value, self.prompt.value)
        if key not in self._captured:
            self._captured[key] = attention_maps(self.model, self.processor, self.images[key[0]], key[1],
                                                 max_new_tokens=self.max_new_tokens)
        return self._captured[key]

    def update(self) -> None:
        """Capture the chosen pair if it is new, and show it in the viewer."""
        from IPython.display import display

        self.viewer = AttentionViewer(export_attention(self.maps(), label=f"{self.image.value}: {self.prompt.value}"))
        self.output.clear_output(wait=True)
        with self.output:
            display(self.viewer)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
