"""Publishing images from a node's graph into a share, so that every node can use them.

The share keeps one directory per layer and per image (the per-entry shape read by
graftfs.catalog.scan). An entry becomes visible to readers only when it is complete, so
each one is first written in full to a staging directory on the share itself, then renamed into
place: layers bottom-up (the overlay directory, then its record), the image record last. A
publisher killed half-way leaves staging debris (invisible to readers, cleaned up by a re-run)
and never a half-visible image. Two publishers of the same content-addressed entry do not
collide: whoever renames second finds the entry in place and keeps the first one.

The source graph is a containers/storage graph directory (``layers.json``/``images.json``),
plain or a graftfs mount.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from graftfs.format.atomic import write_file_atomically
from graftfs.format.names import (
    ID_RE,
    IMAGE_RECORD,
    IMAGES,
    IMAGES_JSON,
    LAYER_RECORD,
    LAYERS,
    LAYERS_JSON,
    MANAGED_DIRS,
    MARKER_NAME,
    OVERLAY,
    STAGING_DIR,
)
from graftfs.format.records import read_index, record_names, walk_chain
from graftfs.format.refs import match_image_ref
from graftfs.linux import die_with_parent
from graftfs.share import leases
from graftfs.share.gc import reinstate

MARKER_TEXT = "graftfs share v1\n"

Record = dict[str, object]
Progress = Callable[[str], None]
#: Called while a layer is copied with (bytes copied so far, bytes expected); for a progress bar.
Meter = Callable[[int, int], None]
#: How often a running copy is measured for the progress bar.
METER_INTERVAL = 0.5


class PublishError(Exception):
    """Publishing cannot go on; the message is the one line the user sees."""


@dataclass
class LayerResult:
    id: str
    status: str  # "published", "already published" or "local" (not copied: see Publisher.local)
    bytes: int = 0


@dataclass
class ImageResult:
    id: str
    names: list[str]
    status: str = "published"
    layers: list[LayerResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "names": self.names, "status": self.status,
                "layers": [vars(la) for la in self.layers]}


@dataclass
class Graph:
    """A containers/storage graph directory's records."""

    root: str
    layers: dict[str, Record]
    images: list[Record]

    @classmethod
    def load(cls, root: str) -> Graph:
        if not os.path.isdir(os.path.join(root, LAYERS)):
            raise PublishError(f"{root} is not a containers/storage graph (no {LAYERS}/)")
        try:
            layers = read_index(os.path.join(root, *LAYERS_JSON))
            images = read_index(os.path.join(root, *IMAGES_JSON))
        except ValueError as e:
            raise PublishError(str(e)) from None
        return cls(root, {str(r.get("id")): r for r in layers}, images)

    def find(self, ref: str) -> Record:
        """An image by full id, unique id prefix, or name (``bb:1`` also matches ``localhost/bb:1``)."""
        by_id = {str(i.get("id", "")): i for i in self.images}
        found = match_image_ref(ref, {iid: record_names(i) for iid, i in by_id.items()})
        if len(found) == 1:
            return by_id[found[0]]
        if not found:
            raise PublishError(f"no image {ref!r} in {self.root}")
        raise PublishError(f"{ref!r} matches {len(found)} images in {self.root}; give the full id")

    def chain(self, image: Record) -> list[Record]:
        """The image's layers, bottom first."""
        top = image.get("layer")
        ids = list(walk_chain(top if isinstance(top, str) else None, self._parent))
        label = str(image.get("id"))[:12]
        missing = [lid for lid in ids if lid not in self.layers]
        if missing:
            raise PublishError(f"layer {missing[0][:12]} of image {label} is not in the graph")
        if ids and self._parent(ids[-1]):
            raise PublishError(f"the layer chain of image {label} loops")  # the walk stopped at a layer seen
        return [self.layers[lid] for lid in reversed(ids)]

    def _parent(self, lid: str) -> str | None:
        parent = self.layers.get(lid, {}).get("parent")
        return parent if isinstance(parent, str) and parent else None


class Publisher:
    def __init__(self, graph: Graph, share: str, progress: Progress | None = None, meter: Meter | None = None,
                 local: set[str] | None = None) -> None:
        self.graph = graph
        self.share = share
        #: layers the target does not need copies of (a pin skips the node's own layers)
        self.local = local or set()
        self.progress = progress or (lambda line: None)
        self.meter = meter
        self.staging = os.path.join(share, STAGING_DIR, uuid.uuid4().hex)
        self.abilities: Abilities | None = None  # what the share's filesystem can keep (probed once)

    def publish(self, ref: str) -> ImageResult:
        image = self.graph.find(ref)
        iid = str(image.get("id"))
        if not ID_RE.match(iid):
            raise PublishError(f"image id {iid[:70]!r} is not a 64-hex id")
        result = ImageResult(iid, record_names(image))
        layers = self.graph.chain(image)  # before touching the share: a broken graph changes nothing
        self._lay_out_share()
        # the intent comes before looking at what the share holds: a concurrent gc then either
        # sees it and keeps those entries, or deleted them before we looked (and we copy them)
        try:
            with leases.intent(self.share, [str(la["id"]) for la in layers], [iid], os.path.basename(self.staging)):
                # only now: a gc that read the claims before this intent was written must not find
                # the staging directory older than its own clock reading (it would take it for debris)
                os.makedirs(self.staging)
                for n, layer in enumerate(layers, 1):
                    result.layers.append(self._layer(layer))
                    self.progress(f"layer {n}/{len(layers)} {str(layer['id'])[:12]}: {result.layers[-1].status}")
                result.status = self._image(image)
                if reinstate(self.share, iid):
                    result.status = "published again (was retired)"
                self.progress(f"image {iid[:12]} {' '.join(result.names)}: {result.status}")
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        return result

    def _lay_out_share(self) -> None:
        """An empty directory becomes a share (its marker written last, atomically)."""
        if os.path.exists(os.path.join(self.share, MARKER_NAME)):
            pass
        elif any(os.path.exists(os.path.join(self.share, d)) for d in MANAGED_DIRS):
            pass  # a share without a marker (written by iSulad): publish into it as it is
        else:
            write_file_atomically(os.path.join(self.share, MARKER_NAME), MARKER_TEXT)
        for d in (*MANAGED_DIRS, STAGING_DIR):
            os.makedirs(os.path.join(self.share, d), exist_ok=True)

    def _layer(self, record: Record) -> LayerResult:
        lid = str(record["id"])
        if not ID_RE.match(lid):
            raise PublishError(f"layer id {lid[:70]!r} is not a 64-hex id")
        if lid in self.local:
            return LayerResult(lid, "local")
        overlay_dst = os.path.join(self.share, OVERLAY, lid)
        record_dst = os.path.join(self.share, LAYERS, lid)
        if os.path.exists(os.path.join(overlay_dst, "link")) and os.path.exists(os.path.join(record_dst, LAYER_RECORD)):
            return LayerResult(lid, "already published")
        src = os.path.join(self.graph.root, OVERLAY, lid)
        stage = os.path.join(self.staging, f"{lid}.{uuid.uuid4().hex[:8]}")  # a layer may be staged twice
        os.makedirs(stage)
        expected = record.get("diff-size")
        size = _copy_overlay_dir(src, os.path.join(stage, "overlay"), self._abilities(lid, src), self.meter,
                                 expected if isinstance(expected, int) else 0)
        self._write_lower(record, os.path.join(stage, "overlay"))
        rec_dir = os.path.join(stage, "record")
        os.mkdir(rec_dir)
        _write_json(os.path.join(rec_dir, LAYER_RECORD), record)
        tar_split = os.path.join(self.graph.root, LAYERS, f"{lid}.tar-split.gz")
        if os.path.exists(tar_split):
            shutil.copyfile(tar_split, os.path.join(rec_dir, f"{lid}.tar-split.gz"))
        _sync_tree(stage)
        _place(os.path.join(stage, "overlay"), overlay_dst)
        _place(rec_dir, record_dst)
        return LayerResult(lid, "published", size)

    def _abilities(self, lid: str, src: str) -> Abilities:
        """What the share can keep, probed in the staging directory at the first layer; refuses
        (PublishError, one line) a layer that needs what the share cannot store."""
        if self.abilities is None:
            self.abilities = Abilities.probe(self.staging)
            if not self.abilities.link_owners:
                self.progress(f"note: {self.share} cannot keep the owner and times of symbolic links (an sftp "
                              "share does not); they are published owned by the publishing user and with the time "
                              "of the copy, everything else as it is")
        missing = self.abilities.missing_for(os.path.realpath(os.path.join(src, "diff")))
        if missing:
            raise PublishError(f"layer {lid[:12]} holds {missing}, which {self.share} cannot store; publish to a "
                               "filesystem that can (NFS, CephFS, GlusterFS, a local one)")
        return self.abilities

    def _write_lower(self, record: Record, overlay: str) -> None:
        """The layer's ``lower`` as the *share* names its parents: short names are chosen per
        graph, and a parent published from another graph has its own. Parentless layers get
        ``empty/`` instead, as containers/storage expects."""
        parent = record.get("parent")
        lower = os.path.join(overlay, "lower")
        if not parent:
            if os.path.exists(lower):
                os.unlink(lower)
            os.makedirs(os.path.join(overlay, "empty"), exist_ok=True)
            return
        with open(lower, "w") as f:
            f.write(":".join(self._lower_of(str(parent))))

    def _lower_of(self, parent: str) -> list[str]:
        """A child's lowers: the parent's short link, then the parent's own lowers.

        A concurrent gc may have the parent out of view for a moment (it puts back what our
        intent names), so a parent found missing is published again, and read again."""
        record = self.graph.layers.get(parent, {})
        for _ in range(3):
            pdir = os.path.join(self.share, OVERLAY, parent)
            if parent in self.local:
                pdir = os.path.join(self.graph.root, OVERLAY, parent)  # not copied: as the graph names it
            try:
                with open(os.path.join(pdir, "link")) as f:
                    chain = [f"l/{f.read().strip()}"]
                if record.get("parent"):  # a parent with a parent of its own has a lower file
                    with open(os.path.join(pdir, "lower")) as f:
                        chain += [p for p in f.read().strip().split(":") if p]
                return chain
            except FileNotFoundError:
                if parent in self.local or not record:
                    raise
                if os.path.exists(os.path.join(pdir, "link")):
                    raise PublishError(f"layer {parent[:12]} in the share has no lower file (a damaged entry: "
                                       "see graftfs fsck)") from None
                self._layer(record)
        raise PublishError(f"parent layer {parent[:12]} keeps vanishing from the share (is a gc running?)")

    def _image(self, record: Record) -> str:
        iid = str(record["id"])
        dst = os.path.join(self.share, IMAGES, iid)
        if os.path.exists(os.path.join(dst, IMAGE_RECORD)):
            return "already published"
        stage = os.path.join(self.staging, iid)
        src = os.path.join(self.graph.root, IMAGES, iid)
        if os.path.isdir(src):
            # manifest, config and other big-data files, links followed (no graftfs link is data)
            shutil.copytree(src, stage, symlinks=False)
        else:
            os.makedirs(stage)
        _write_json(os.path.join(stage, IMAGE_RECORD), record)
        _sync_tree(stage)
        return "published" if _place(stage, dst) else "already published"


@dataclass(frozen=True)
class Abilities:
    """What a share's filesystem keeps of a layer's files (sshfs, for one, keeps neither the
    owner of a symbolic link nor extended attributes nor device nodes)."""

    link_owners: bool  # and their times
    xattrs: bool
    devices: bool

    @classmethod
    def probe(cls, directory: str) -> Abilities:
        probe = os.path.join(directory, ".graftfs-probe")
        os.makedirs(probe)
        try:
            return cls(_can(lambda: _owned_link(probe)), _can(lambda: _xattr_file(probe)),
                       _can(lambda: os.mknod(os.path.join(probe, "dev"), stat.S_IFCHR | 0o600, 0)))
        finally:
            shutil.rmtree(probe, ignore_errors=True)

    def missing_for(self, diff: str) -> str:
        """What ``diff`` holds that the share cannot store ("" when nothing)."""
        if self.xattrs and self.devices:
            return ""
        for d, dirs, files in os.walk(diff):
            for name in dirs + files:
                path = os.path.join(d, name)
                st = os.lstat(path)
                if not self.devices and (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                    return f"device nodes ({os.path.relpath(path, diff)}: overlay whiteouts are device nodes)"
                if not self.xattrs and not stat.S_ISLNK(st.st_mode) and os.listxattr(path, follow_symlinks=False):
                    return f"extended attributes ({os.path.relpath(path, diff)})"
        return ""


def _can(action: Callable[[], object]) -> bool:
    try:
        action()
    except OSError:
        return False
    return True


def _owned_link(directory: str) -> None:
    link = os.path.join(directory, "link")
    os.symlink("/nonexistent/target", link)  # dangling, like most links in a layer seen from the share
    os.chown(link, os.getuid(), os.getgid(), follow_symlinks=False)
    os.utime(link, ns=(0, 0), follow_symlinks=False)


def _xattr_file(directory: str) -> None:
    path = os.path.join(directory, "xattr")
    with open(path, "w"):
        pass
    os.setxattr(path, "user.graftfs.probe", b"1")


def _copy_overlay_dir(src: str, dst: str, abilities: Abilities, meter: Meter | None = None,
                      expected: int = 0) -> int:
    """Copy a layer's overlay directory: diff (everything kept: owners, modes, xattrs, whiteout
    devices, hard links), its link and lower files; an empty work/. Returns the bytes copied.
    With a ``meter``, the copy's progress is measured every METER_INTERVAL seconds."""
    os.makedirs(dst)
    for name in ("link", "lower"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    if not os.path.exists(os.path.join(dst, "link")):
        raise PublishError(f"{src} has no link file: not a complete overlay layer")
    os.mkdir(os.path.join(dst, "work"))
    # --preserve=xattr named explicitly: a share that cannot store an xattr (an opaque-directory
    # marker) is then an error, not a silently different layer; the copy dies with the publisher
    # a graftfs graph shows diff as a link to the backing directory: copy what it points to
    diff = os.path.realpath(os.path.join(src, "diff"))
    # a share that cannot keep a link's owner and times: cp keeps no owner and time at all, and
    # those of everything but links are set after the copy
    owners = [] if abilities.link_owners else ["--no-preserve=ownership,timestamps"]
    with subprocess.Popen(["cp", "-a", *owners, "--preserve=xattr", "--", diff, os.path.join(dst, "diff")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          stdin=subprocess.DEVNULL, preexec_fn=die_with_parent) as cp:
        while meter is not None:
            try:
                cp.wait(METER_INTERVAL)
                break
            except subprocess.TimeoutExpired:
                meter(_tree_bytes(os.path.join(dst, "diff")), expected)
        err = cp.communicate()[1]
    if cp.returncode != 0:
        last = err.strip().splitlines()[-1] if err.strip() else f"exit status {cp.returncode}"
        raise PublishError(f"copying {src}/diff failed: {last}")
    if not abilities.link_owners:
        _copy_owners(diff, os.path.join(dst, "diff"))
    size = _tree_bytes(os.path.join(dst, "diff"))
    if meter is not None:
        meter(size, max(size, expected))
    return size


def _copy_owners(src: str, dst: str) -> None:
    """Give every entry of ``dst`` but symbolic links the owner and times of its twin in ``src``
    (directories after what they hold: writing into one moves its mtime)."""
    for d, dirs, files in os.walk(src, topdown=False):
        for name in [*files, *dirs, ""]:
            path = os.path.join(d, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            twin = os.path.join(dst, os.path.relpath(path, src))
            os.chown(twin, st.st_uid, st.st_gid, follow_symlinks=False)
            os.chmod(twin, stat.S_IMODE(st.st_mode))  # a chown clears set-user-ID and set-group-ID bits
            os.utime(twin, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _tree_bytes(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                continue  # being written right now
    return total


def _write_json(path: str, record: Record) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f)


def _sync_tree(path: str) -> None:
    """Make a staged entry durable before it is renamed into view (a reader on another node
    must never see a visible entry whose files are not on the server)."""
    subprocess.run(["sync", "-f", path], check=False, stdin=subprocess.DEVNULL)


def _place(stage: str, dst: str) -> bool:
    """Rename a staged entry into place; False when another publisher got there first."""
    try:
        os.rename(stage, dst)
    except OSError as e:
        if os.path.isdir(dst):
            return False  # ENOTEMPTY/EEXIST: already in place, keep the first
        raise PublishError(f"placing {dst} failed: {e.strerror}") from None
    return True
