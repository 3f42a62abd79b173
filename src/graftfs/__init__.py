"""graftfs: one FUSE mount in place of a container runtime's graph directory, merging a node's
local RW tree with read-only image trees shared by every node of a cluster."""

__version__ = "0.1.0"
