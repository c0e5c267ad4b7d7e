"""Control maps computed for the user. Only maps that need no downloaded weights: Canny edges (OpenCV).

Depth, normal, pose and the other maps of the In-Context and ControlNet models are accepted as images; computing
them needs annotator networks whose weights would be downloaded at run time, which qistudio does not do.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .imageio import load_image


def canny(image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """Canny edges of an image (PIL or path) as a white-on-black RGB image of the same size."""
    try:
        import cv2
    except ImportError:
        raise ImportError("the Canny annotator needs OpenCV: pip install opencv-python-headless "
                          "(or pip install 'qistudio[annotators]')") from None
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"need 0 <= low_threshold <= high_threshold, got {low_threshold}, {high_threshold}")
    gray = np.asarray(load_image(image).convert("L"))
    edges = cv2.Canny(gray, low_threshold, high_threshold)
    return Image.fromarray(edges).convert("RGB")
