"""The bottom layer: how image entries are named and written, shared by everything above.

Nothing here knows about FUSE, the merged view or the daemon. ``names`` holds the directory and
file names of a graph and of a share; ``records`` reads and checks the records of one entry;
``atomic`` is the one way graftfs writes a whole file; ``attrs`` is the attribute value type;
``refs`` resolves what a user typed to image ids.
"""
