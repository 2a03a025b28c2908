"""The preprocessing that belongs to a set of weights, apart from any model code: `data/`,
`transforms`, `export` and `predict` read it without importing the weights machinery
(`finetune.sources` computes it for each weight source)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from finetune.errors import FinetuneError

CROP_MODES = ("center", "squash", "border")  # timm's eval crop modes


@dataclass(frozen=True)
class InputSpec:
    """The preprocessing that belongs to a set of weights (torchvision's eval preset, timm's cfg).

    Evaluation resizes to `resize_size` (timm: `floor(crop_size / crop_pct)`) as `crop_mode`
    says, then takes the centre `crop_size` square (see `finetune.transforms.eval_transform`):
    `center` resizes the shorter side, `squash` both sides (the aspect ratio changes, nothing
    is cut off when resize equals crop), `border` the longer side and pads with the mean colour.
    Raises `FinetuneError` for another crop mode.
    """

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # torchvision InterpolationMode value: "bilinear" | "bicubic" | ...
    crop_mode: str = "center"  # timm's pretrained-config crop_mode: center | squash | border

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise FinetuneError(
                f"Unknown crop mode '{self.crop_mode}' in an input spec; valid: "
                f"{', '.join(CROP_MODES)}. Fix: use one of them (timm's crop modes)."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def interpolation_name(value: Any) -> str:
    """An `InputSpec.interpolation` from a torchvision `InterpolationMode` or a library's name
    of one (timm's `"bicubic"`)."""
    return getattr(value, "value", str(value)).lower()
