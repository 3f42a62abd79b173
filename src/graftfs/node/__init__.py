"""One node's mount: the daemon's wiring and what runs beside the FUSE loop.

``daemon`` builds the view from the mount options (``options``) and serves it; ``keeper`` renews
the node's leases in its shares; ``binds`` puts the runtime's hot files under bind mounts;
``mounts`` reads the mount table and keeps the daemons' runtime records. Importing this package
loads neither pyfuse3 nor trio: ``daemon`` and ``keeper`` are imported only to mount.
"""
