"""Display order of one line of text: the Unicode bidirectional algorithm for a left-to-right line.

PDF text is drawn left to right in display order; PDF readers and text extraction give the logical order
back. :func:`visual_order` follows rules W1-W7, N0 (simplified), N1-N2, I1, L1, L2 and L4 of the
algorithm, without embeddings.
"""

from __future__ import annotations

import unicodedata

#: Paired brackets (Unicode BidiBrackets, the common ones) and their mirror images.
_BRACKETS = {"(": ")", "[": "]", "{": "}", "«": "»", "‹": "›"}
_MIRROR = {**_BRACKETS, **{c: o for o, c in _BRACKETS.items()}, "<": ">", ">": "<"}


def visual_order(text: str) -> str:
    """A one-line text in display order, left to right: runs of right-to-left letters (Hebrew, Arabic) are
    reversed, numbers inside them keep their order, brackets inside them are mirrored, and combining marks
    stay after their base letter. Text without right-to-left letters is returned unchanged."""
    types = [unicodedata.bidirectional(c) or "L" for c in text]
    if not any(t in ("R", "AL") for t in types):
        return text
    types = _weak_types(types)
    _bracket_pairs(text, types)
    _neutral_types(types)
    levels = [0 if t == "L" else 1 if t == "R" else 2 for t in types]  # I1
    k = len(text)
    while k > 0 and unicodedata.bidirectional(text[k - 1]) in ("WS", "S", "B"):  # L1
        k -= 1
        levels[k] = 0
    return _reorder(text, levels)


def _strong(t: str) -> str | None:
    return "L" if t == "L" else "R" if t in ("R", "EN", "AN") else None


def _weak_types(types: list[str]) -> list[str]:
    """Rules W1-W7: the bidirectional types of marks, numbers and separators resolved from their context."""
    n = len(types)
    for i, t in enumerate(types):  # W1
        if t == "NSM":
            types[i] = types[i - 1] if i else "L"
    last = "L"
    for i, t in enumerate(types):  # W2, W3
        if t in ("L", "R", "AL"):
            last = t
        elif t == "EN" and last == "AL":
            types[i] = "AN"
    types = ["R" if t == "AL" else t for t in types]
    for i in range(1, n - 1):  # W4
        if types[i] == "ES" and types[i - 1] == types[i + 1] == "EN":
            types[i] = "EN"
        elif types[i] == "CS" and types[i - 1] == types[i + 1] and types[i - 1] in ("EN", "AN"):
            types[i] = types[i - 1]
    i = 0
    while i < n:  # W5
        j = i
        while j < n and types[j] == "ET":
            j += 1
        if j > i and ((i > 0 and types[i - 1] == "EN") or (j < n and types[j] == "EN")):
            types[i:j] = ["EN"] * (j - i)
        i = max(j, i + 1)
    types = ["ON" if t in ("ES", "ET", "CS") else t for t in types]  # W6
    last = "L"
    for i, t in enumerate(types):  # W7
        if t in ("L", "R"):
            last = t
        elif t == "EN" and last == "L":
            types[i] = "L"
    return types


def _bracket_pairs(text: str, types: list[str]) -> None:
    """Rule N0 (simplified), in place: a bracket pair takes the direction of what it encloses, in context."""
    stack: list[tuple[str, int]] = []
    for i, ch in enumerate(text):
        if types[i] != "ON":
            continue
        if ch in _BRACKETS:
            stack.append((_BRACKETS[ch], i))
        elif ch in _MIRROR and any(c == ch for c, _ in stack):
            while stack[-1][0] != ch:
                stack.pop()
            o = stack.pop()[1]
            inside = {_strong(t) for t in types[o + 1:i]}
            if "L" in inside:
                types[o] = types[i] = "L"
            elif "R" in inside:
                before = next((_strong(t) for t in reversed(types[:o]) if _strong(t)), "L")
                types[o] = types[i] = before


def _neutral_types(types: list[str]) -> None:
    """Rules N1-N2, in place: a run of neutrals between two strong types of one direction takes it, else L."""
    n, i = len(types), 0
    while i < n:
        if _strong(types[i]) is None:
            j = i
            while j < n and _strong(types[j]) is None:
                j += 1
            before = _strong(types[i - 1]) if i > 0 else "L"
            after = _strong(types[j]) if j < n else "L"
            types[i:j] = [before if before == after else "L"] * (j - i)
            i = j
        else:
            i += 1


def _reorder(text: str, levels: list[int]) -> str:
    """Rules L4 and L2: brackets in right-to-left runs mirrored, then every run at or above each level
    reversed, from the highest level down, a letter kept with its combining marks."""
    clusters: list[tuple[int, str]] = []  # a letter with its combining marks
    for i, ch in enumerate(text):
        if levels[i] % 2:  # L4: a bracket in a right-to-left run is drawn mirrored
            ch = _MIRROR.get(ch, ch)
        if clusters and unicodedata.category(ch).startswith("M"):
            clusters[-1] = (clusters[-1][0], clusters[-1][1] + ch)
        else:
            clusters.append((levels[i], ch))
    for lv in range(max(lv for lv, _ in clusters), 0, -1):  # L2
        i = 0
        while i < len(clusters):
            if clusters[i][0] >= lv:
                j = i
                while j < len(clusters) and clusters[j][0] >= lv:
                    j += 1
                clusters[i:j] = clusters[i:j][::-1]
                i = j
            else:
                i += 1
    return "".join(s for _, s in clusters)
