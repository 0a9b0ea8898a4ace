"""The backend interface, and the backend of platforms that need no trick (CUDA, the meta device)."""

from __future__ import annotations

from torch import nn


class Backend:
    """What a platform changes about a model at load: here nothing, the checkpoint's layout and torch's kernels."""

    def stored_transposed(self, model: nn.Module) -> set[str]:
        """The parameters of `model` (built on the meta device) to store physically [in, out], as transposed views
        that keep their logical [out, in] shape."""
        return set()

    def prepare(self, model: nn.Module) -> None:
        """Adapts the loaded `model`, its modules or the process, to the platform; nothing to adapt here."""
