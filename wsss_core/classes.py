"""Class lists, CLIP-ES synonyms and background prompts, and the VOC colour palette.

Class lists are data: a dataset may bring its own names (``classes.txt``); the VOC and COCO
lists here are the defaults. Synonyms and background sets follow the CLIP-ES reference code
(Lin et al., CVPR 2023).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# Sentence-level synonym fusion: the class slot of the template holds all of these at once.
VOC_SYNONYMS: dict[str, str] = {
    "aeroplane": "aeroplane",
    "bicycle": "bicycle",
    "bird": "bird, avian",
    "boat": "boat",
    "bottle": "bottle",
    "bus": "bus",
    "car": "car",
    "cat": "cat",
    "chair": "chair, seat",
    "cow": "cow",
    "diningtable": "table",
    "dog": "dog",
    "horse": "horse",
    "motorbike": "motorbike",
    "person": "person with clothes, people, human",
    "pottedplant": "potted plant",
    "sheep": "sheep",
    "sofa": "sofa",
    "train": "train",
    "tvmonitor": "tvmonitor, screen",
}

VOC_BACKGROUND: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river",
    "sea", "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean",
    "road", "rock", "street", "valley", "bridge", "sign",
)  # fmt: skip

COCO_BACKGROUND: tuple[str, ...] = tuple(b for b in VOC_BACKGROUND if b not in ("keyboard", "sign"))

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip

COCO_SYNONYMS: dict[str, str] = {
    "person": "person with clothes, people, human",
    "bird": "bird, avian",
    "chair": "chair, seat",
    "tv": "tvmonitor, screen",
}


@dataclass(frozen=True)
class ClassSet:
    """The foreground classes of a dataset, in label order 1..C, with their text for CLIP.

    Attributes:
        names: C class names; label ``i`` (1-based) is ``names[i - 1]``.
        synonyms: name -> text placed in the template's class slot (defaults to the name).
        background: background prompts that compete in the softmax (CLIP-ES).
    """

    names: tuple[str, ...]
    synonyms: dict[str, str] = field(default_factory=dict)
    background: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a class set needs at least one class name")
        dupes = sorted({n for n in self.names if self.names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate class names: {dupes}")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def label_of(self, name: str) -> int:
        """1-based label of ``name``; raises KeyError naming the known classes."""
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise KeyError(
                f"unknown class name {name!r}; known: {', '.join(self.names)}"
            ) from None

    def text(self, name: str, fuse_synonyms: bool = True) -> str:
        return self.synonyms.get(name, name) if fuse_synonyms else name


VOC = ClassSet(VOC_CLASSES, VOC_SYNONYMS, VOC_BACKGROUND)
COCO = ClassSet(COCO_CLASSES, COCO_SYNONYMS, COCO_BACKGROUND)


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map: uint8 [256, 3]; index 255 is (224, 224, 192) as in VOC."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette
