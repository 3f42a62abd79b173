"""Mount configuration: the command line and ``-o`` option strings (mount(8), fstab) as one shape.

``graftfs mount --rw A --ro B MP`` and ``graftfs mount -o rw=A,ro=B MP`` (which is what
``mount -t graftfs none MP -o rw=A,ro=B`` and an fstab line turn into) build the same
MountConfig. Options graftfs does not know give a one-line error instead of being ignored,
except the ones mount(8) and systemd add for their own use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

LAYOUTS = ("auto", "isulad", "containers-storage")

#: FUSE options passed through to the kernel mount.
FUSE_FLAGS = {"allow_other", "default_permissions", "auto_unmount", "ro", "rw", "dev", "nodev",
              "suid", "nosuid", "noatime", "atime", "exec", "noexec", "sync", "async", "dirsync"}
FUSE_KEYS = {"fsname", "subtype", "max_read"}
#: Options mount(8), fstab and systemd use for themselves; they do not reach the filesystem.
MOUNT_NOISE = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
               "owner", "group", "nosymfollow"}
DEFAULT_FUSE_OPTIONS = ("allow_other", "default_permissions", "dev", "suid")
#: What an image-name pattern may hold: a name's characters and the glob's (``*?[]``), ``!`` first.
PATTERN_RE = re.compile(r"^!?[A-Za-z0-9._/:@*?\[\]-]+$")


def _within(path: str, top: str) -> bool:
    """True when ``path`` is ``top`` or below it (both absolute, symlink-free)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


class ConfigError(ValueError):
    """A bad mount configuration; its message is the one line the user sees."""


def parse_listen_address(value: str) -> tuple[str, int]:
    """``metrics=HOST:PORT`` as (host, port); an IPv6 address in brackets (``[::1]:9108``).

    Only the shape is checked here (``graftfs mount`` says so before starting a daemon); whether
    the address can be listened on is found when the daemon binds it (graftfs.node.metrics)."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"metrics={value!r}: write an IPv6 address in brackets, e.g. [::1]:9108")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ConfigError(f"metrics={value!r} is not HOST:PORT (e.g. 127.0.0.1:9108, 0.0.0.0:9108 for every "
                          "interface)")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ConfigError(f"metrics={value!r}: the port must be between 1 and 65535")
    return host, number


def format_listen_address(host: str, port: int) -> str:
    """The ``metrics=`` value that parses back to (host, port)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class MountConfig:
    mountpoint: str
    rw: str | None = None
    ro: list[str] = field(default_factory=list)
    layout: str = "auto"
    log_file: str | None = None
    timeout: float = 10.0
    poll: float = 0.5  # seconds between polls of each shared tree; 0 turns the watcher off
    share_inotify: bool = True  # let inotify wake the poller of shared trees on local filesystems
    lease: float = 30.0  # seconds between renewals of this node's leases in the shares; 0: no leases
    direct: bool | None = None  # show layer dirs, lock files... as links to RW/RO; None: the layout's default
    kernel_opens: bool | None = None  # the kernel opens files without asking (graftfs.fuse.files); None: if it can
    publish: bool = False  # publish=auto: images this node pulls or builds go to the first share
    publish_match: list[str] = field(default_factory=list)  # image-name globs; !glob excludes; none: all
    metrics: tuple[str, int] | None = None  # metrics=HOST:PORT: serve Prometheus metrics there (node.metrics)
    fuse_options: list[str] = field(default_factory=list)

    def add_options(self, text: str) -> None:
        """Merge one ``-o`` string (comma separated) into this configuration."""
        for item in filter(None, (o.strip() for o in text.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                self._add_flag(key)
            else:
                self._add_keyed(key, value)

    def _add_flag(self, key: str) -> None:
        if key in FUSE_FLAGS:
            self.fuse_options.append(key)
        elif key in MOUNT_NOISE or key.startswith(("x-", "comment")):
            return
        else:
            raise ConfigError(f"unknown mount option {key!r}")

    def _add_keyed(self, key: str, value: str) -> None:
        if key == "rw":
            if self.rw is not None and self.rw != value:
                raise ConfigError("only one rw= directory may be given")
            self.rw = value
        elif key == "ro":
            self.ro.extend(v for v in value.split(":") if v)
        elif key == "layout":
            self.layout = value
        elif key in ("log", "log_file"):
            self.log_file = value
        elif key == "timeout":
            try:
                self.timeout = float(value)
            except ValueError:
                raise ConfigError(f"timeout={value!r} is not a number of seconds") from None
            if not 0 < self.timeout <= 3600:
                raise ConfigError("timeout= must be between 0 and 3600 seconds")
        elif key == "poll":
            try:
                self.poll = float(value)
            except ValueError:
                raise ConfigError(f"poll={value!r} is not a number of seconds") from None
            if not 0 <= self.poll <= 3600:
                raise ConfigError("poll= must be between 0 (no watcher) and 3600 seconds")
        elif key == "lease":
            try:
                self.lease = float(value)
            except ValueError:
                raise ConfigError(f"lease={value!r} is not a number of seconds") from None
            if not (self.lease == 0 or 0.1 <= self.lease <= 86400):
                raise ConfigError("lease= must be 0 (no leases) or between 0.1 and 86400 seconds")
        elif key == "share_inotify":
            if value not in ("0", "1"):
                raise ConfigError("share_inotify= must be 0 (poll only) or 1")
            self.share_inotify = value == "1"
        elif key == "direct":
            if value not in ("0", "1", "auto"):
                raise ConfigError("direct= must be 0 (serve everything through graftfs), 1 or auto")
            self.direct = None if value == "auto" else value == "1"
        elif key == "kernel_opens":
            if value not in ("0", "1", "auto"):
                raise ConfigError("kernel_opens= must be 0 (graftfs serves every open), 1 or auto")
            self.kernel_opens = None if value == "auto" else value == "1"
        elif key == "publish":
            if value not in ("auto", "off"):
                raise ConfigError("publish= must be auto (publish what this node pulls or builds) or off")
            self.publish = value == "auto"
        elif key == "publish_match":
            if not PATTERN_RE.match(value):
                raise ConfigError(f"publish_match={value!r} is not an image-name pattern (e.g. docker.io/*, "
                                  "!registry.example.com/*)")
            self.publish_match.append(value)
        elif key == "metrics":
            self.metrics = parse_listen_address(value)
        elif key in FUSE_KEYS:
            self.fuse_options.append(f"{key}={value}")
        elif key.startswith(("x-", "comment")):
            return
        else:
            raise ConfigError(f"unknown mount option {key!r}")

    def check(self) -> None:
        """Validate the configuration against the machine; raise ConfigError with one line."""
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r} (choose from {', '.join(LAYOUTS)})")
        if self.rw is None:
            raise ConfigError("no RW directory given (--rw DIR or -o rw=DIR)")
        if not self.ro:
            raise ConfigError("no RO directory given (--ro DIR or -o ro=DIR)")
        self.mountpoint = os.path.realpath(self.mountpoint)  # as the mount table spells it
        self.rw = os.path.abspath(self.rw)
        self.ro = [os.path.abspath(r) for r in self.ro]
        for what, path in [("mountpoint", self.mountpoint), ("RW directory", self.rw)] + [
            ("RO directory", r) for r in self.ro
        ]:
            if not os.path.isdir(path):
                raise ConfigError(f"{what} {path} does not exist or is not a directory")
        real_mp = os.path.realpath(self.mountpoint)
        trees = [("RW directory", self.rw, os.path.realpath(self.rw))] + [
            ("RO directory", r, os.path.realpath(r)) for r in self.ro
        ]
        for what, path, real in trees:
            if _within(real, real_mp):
                raise ConfigError(f"{what} {path} is the mountpoint or inside it; it would be hidden by the mount")
        if self.publish and self.layout == "isulad":
            raise ConfigError("publish=auto needs the containers-storage layout (it reads the runtime's image records)")
        if len(set(self.ro)) != len(self.ro):
            raise ConfigError("the same RO directory is given twice")
        for i, (what, _, a) in enumerate(trees):
            for other, _, b in trees[i + 1 :]:
                if _within(a, b) or _within(b, a):
                    raise ConfigError(f"{what} {a} and {other} {b} overlap; writes could reach a shared tree")

    def fuse_option_set(self) -> set[str]:
        """The options handed to pyfuse3.init (graftfs' defaults, then the user's)."""
        opts = set(DEFAULT_FUSE_OPTIONS) | {"fsname=graftfs", "subtype=graftfs"}
        for opt in self.fuse_options:
            key = opt.partition("=")[0]
            opts = {o for o in opts if o.partition("=")[0] != key}
            opposite = {"dev": "nodev", "nodev": "dev", "suid": "nosuid", "nosuid": "suid",
                        "ro": "rw", "rw": "ro"}.get(opt)
            opts.discard(opposite or "")
            opts.add(opt)
        return opts

    def to_argv(self) -> list[str]:
        """Arguments that make `graftfs mount` rebuild this configuration (for the daemon)."""
        argv = ["--rw", str(self.rw), "--layout", self.layout]
        for r in self.ro:
            argv += ["--ro", r]
        opts = [*self.fuse_options, f"timeout={self.timeout:g}", f"poll={self.poll:g}",
                f"share_inotify={int(self.share_inotify)}", f"lease={self.lease:g}",
                "direct=" + ("auto" if self.direct is None else str(int(self.direct))),
                "kernel_opens=" + ("auto" if self.kernel_opens is None else str(int(self.kernel_opens))),
                "publish=" + ("auto" if self.publish else "off"), *(f"publish_match={p}" for p in self.publish_match)]
        if self.metrics is not None:
            opts.append(f"metrics={format_listen_address(*self.metrics)}")
        argv += ["-o", ",".join(opts)]
        if self.log_file:
            argv += ["--log-file", self.log_file]
        argv.append(self.mountpoint)
        return argv
