"""What a user typed (``app:1``, ``localhost/app:1``, an id or a prefix) to image ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def match_image_ref(ref: str, images: Mapping[str, Sequence[str]]) -> list[str]:
    """Image ids (of ``images``: id -> names) that ``ref`` names: the full id or an exact name;
    failing those, a unique-enough id prefix (4+ digits) or a name without its registry
    (``bb:1`` for ``localhost/bb:1``) or tag (``:latest``)."""
    exact = [i for i, names in images.items() if i == ref or ref in names]
    if exact:
        return exact
    return [i for i, names in images.items()
            if (len(ref) >= 4 and i.startswith(ref))
            or any(n.endswith("/" + ref) or n.endswith("/" + ref + ":latest") for n in names)]
