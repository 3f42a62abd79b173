"""The merged view: what the runtime sees at each path, free of FUSE.

``layout`` is the one interface a presenter offers the namespace, the FUSE adapter and the
daemon; ``plain``, ``isulad`` and ``containers_storage`` are the presenters (the last two build
on ``entries``, the per-entry part they share, and never on each other);
``namespace`` is the union model (RW over shared trees, copy-up, hides); ``hides`` the node's
deletions of shared entries; ``lock_tokens`` how containers/storage clients learn of changes.
"""
