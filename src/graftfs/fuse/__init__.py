"""The FUSE adapter: the only package that imports pyfuse3.

``operations`` turns kernel requests into namespace calls (graftfs.view.namespace) through one
errno boundary (``errors``), with worker threads and time limits (``workers``) and inode numbers
(``inodes``); ``watcher`` and ``kernel_cache`` keep the kernel's caches exact as the shared trees
and the RW tree change behind the mount (``inotify`` wakes them early on local trees); ``session``
mounts, serves and unmounts.
"""
