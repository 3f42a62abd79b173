"""The iSulad layout: shared trees presented as iSulad's per-entry graph, complete entries only.

iSulad (and the legacy containers/storage per-entry layout) keeps one directory per entry:

    overlay/<id>/{diff,link,lower,work,merged}     the layer's files and its short link name
    overlay/l/<short> -> ../<id>/diff               short names that keep mount(2) options short
    overlay-layers/<id>/layer.json                  the layer record (parent, digests, ...)
    overlay-images/<id>/images.json                 the image record (top layer, names, ...)

A shared tree may also be an iSulad *remote-RO* share, where the same entries sit one level down
in ``overlay/RO/<id>`` and ``overlay-layers/RO/<id>`` and iSulad keeps real symlinks beside them.
graftfs presents both shapes in this layout and never shows the ``RO`` directories. A reader
only ever sees *complete* entries (graftfs.catalog); everything else is left out of the view and
reported, with the reason, by ``graftfs status``.
"""

from __future__ import annotations

import os

from graftfs.catalog.live import LiveCatalog
from graftfs.catalog.scan import entry_dirs
from graftfs.format.names import LAYERS, STATE_DIR
from graftfs.view.entries import EntryView
from graftfs.view.layout import NoMergedFiles
from graftfs.view.status import LayoutStatus


def own_layers(rw_root: str) -> set[str]:
    """Layer ids an iSulad graph holds itself: its record directories."""
    return set(entry_dirs(rw_root, LAYERS))


def isulad_catalog(trees: list[str], rw_root: str) -> LiveCatalog:
    """The catalog of an iSulad mount: its RW tree's own layers are its record directories."""
    # listed each time: a directory's mtime may not move for a second entry within one tick
    return LiveCatalog(trees, os.path.join(rw_root, STATE_DIR), lambda: frozenset(own_layers(rw_root)))


class IsuladLayout(EntryView, NoMergedFiles):
    """Presents shared trees in iSulad's per-entry layout (see the module docstring).

    iSulad keeps one record per entry, so nothing is composed (NoMergedFiles). ``direct`` (each
    layer's ``diff/`` and ``work/`` shown as links to their backing directories) is off unless
    asked for (``direct=1``). iSulad's overlay2 driver hands ``l/<link>`` and ``<id>/diff`` to
    mount(2), absolute or relative to ``overlay/``, unpacks a layer through a bind mount of its
    ``diff`` and removes a layer with lstat and unlink, all of which work on the links
    (tests/test_isulad_direct.py makes those calls). But when iSulad starts, it stat()s every
    ``overlay/l/<link>`` and unlinks those that answer ENOENT: through a link
    into a share whose mount is gone, that stat answers ENOENT where graftfs answers EIO, and
    the unlink hides the shared layer's link on this node after the share is back.
    """

    name = "isulad"
    binds = False
    leases = False  # iSulad's state is not read: its nodes write no leases

    def __init__(self, live: LiveCatalog, direct: bool = False) -> None:
        super().__init__(live, direct)

    def announce(self, wait: float | None = None) -> None:
        """After a change of the share's part of the view: nothing to tell iSulad (it rescans)."""

    def status(self) -> LayoutStatus:
        return self.entry_status(self.name)
