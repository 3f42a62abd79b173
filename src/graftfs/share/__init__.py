"""A share's own bookkeeping, beside the entries readers show: who uses what, what is retired.

A share is a directory of per-entry image content (graftfs.format.names, graftfs.catalog.scan) plus a few private
directories, all named ``.graftfs-*`` so that no mount ever shows them:

* ``.graftfs-share``           the marker (an empty mountpoint is never read as "no images");
* ``.graftfs-staging/<uuid>/`` entries being written by a publisher, renamed into place whole;
* ``.graftfs-retired/<id>``    an image retired by ``graftfs unpublish``: readers stop showing it,
  ``graftfs gc`` may delete it (and layers nothing else needs) once no node uses them;
* ``.graftfs-nodes/<node>/lease.json``  what each mounted node's containers and pins use, rewritten
  by that node only (atomic rename, so nodes never contend for a lock) and live for its TTL;
* ``.graftfs-intents/<uuid>.json``  what a running publisher is about to reference, so that a
  concurrent ``gc`` never deletes a layer the new image needs;
* ``.graftfs-trash/<run>/``    entries ``gc`` moved out of view (one rename each) before deleting.

Every one of these is written by one writer and placed by rename: readers see a file whole or not.
Their names are in graftfs.format.names. This package uses graftfs.format and graftfs.catalog only:
it runs in the commands that do not mount, without pyfuse3 or trio.
"""

