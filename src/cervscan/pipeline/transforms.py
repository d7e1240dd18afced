"""Preprocessing shared by training and inference (one definition, no drift)."""

from __future__ import annotations

import cv2
import numpy as np


def resize_square(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize (squash) an RGB uint8 image to ``size`` x ``size`` with area/linear interpolation."""
    h, w = (size, size) if isinstance(size, int) else size
    interp = cv2.INTER_AREA if img.shape[0] > h or img.shape[1] > w else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def to_tensor_batch(images: list[np.ndarray], mean, std):
    """List of HxWx3 uint8 (same size) -> normalised float tensor N x 3 x H x W."""
    import torch  # lazy: torch, out of the model commands (api imports this module)

    arr = np.stack(images).astype(np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def overlay(img: np.ndarray, mask: np.ndarray, color=(0, 255, 0), alpha: float = 0.3,
            cervix: np.ndarray | None = None, cervix_color=(0, 170, 255), box=None) -> np.ndarray:
    """Translucent fill plus contour of a binary lesion mask on an RGB image; the cervix outline
    (``cervix`` mask) and the crop ``box`` (x0, y0, x1, y1) in ``cervix_color`` when given."""
    out = img.copy()
    thick_c = max(1, round(max(img.shape[:2]) / 400))
    if cervix is not None and cervix.any():
        cc, _ = cv2.findContours((cervix > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, cc, -1, cervix_color, thick_c)
    if box is not None and tuple(box) != (0, 0, img.shape[1], img.shape[0]):
        x0, y0, x1, y1 = (int(v) for v in box)
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), cervix_color, thick_c, lineType=cv2.LINE_4)
    m = mask > 0
    if m.any():
        fill = out.copy()
        fill[m] = color
        out = cv2.addWeighted(fill, alpha, out, 1 - alpha, 0)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thick = max(2, round(max(img.shape[:2]) / 300))
        cv2.drawContours(out, contours, -1, color, thick)
    return out
