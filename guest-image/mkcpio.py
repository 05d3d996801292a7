#!/usr/bin/env python3
"""Write a reproducible newc cpio archive of a directory tree to stdout.

Why not cpio(1): it records the builder's uid/gid, mtimes and inode numbers,
and creating device nodes for it needs mknod (root, and a real filesystem).
Here every entry gets uid/gid 0, one fixed mtime (SOURCE_DATE_EPOCH, default
0) and sequential inode numbers, entries are sorted, and device nodes are
described on the command line instead of existing on disk.

usage: mkcpio.py ROOT [--dev PATH:c|b:MAJOR:MINOR:MODE ...] > archive.cpio
"""

import os
import stat
import sys

MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


class Writer:
    def __init__(self, out):
        self.out = out
        self.ino = 0
        self.size = 0

    def entry(self, name, mode, data=b"", rdev=(0, 0), nlink=1):
        self.ino += 1
        namez = name.encode() + b"\0"
        fields = [
            self.ino, mode, 0, 0, nlink, MTIME, len(data),
            0, 0, rdev[0], rdev[1], len(namez), 0,
        ]
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self.write(header + namez)
        self.pad()
        self.write(data)
        self.pad()

    def write(self, b):
        self.out.write(b)
        self.size += len(b)

    def pad(self):
        self.write(b"\0" * (-self.size % 4))

    def trailer(self):
        self.ino = -1  # the trailer's inode number is conventionally 0
        self.entry("TRAILER!!!", 0, nlink=1)
        # Pad to 512 bytes like cpio(1) does; the kernel does not care.
        self.write(b"\0" * (-self.size % 512))


def normal_mode(st):
    """Keep the file type and whether it is executable; drop the rest of the
    builder's permission bits, which depend on its umask."""
    if stat.S_ISDIR(st.st_mode):
        return stat.S_IFDIR | 0o755
    if stat.S_ISLNK(st.st_mode):
        return stat.S_IFLNK | 0o777
    if stat.S_ISREG(st.st_mode):
        return stat.S_IFREG | (0o755 if st.st_mode & 0o111 else 0o644)
    sys.exit(f"mkcpio: unsupported file type: {st}")


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    root = argv[1]
    devs = {}
    args = argv[2:]
    while args:
        if args[0] != "--dev" or len(args) < 2:
            sys.exit(f"mkcpio: bad argument {args[0]!r}\n{__doc__}")
        path, kind, major, minor, mode = args[1].split(":")
        ftype = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[kind]
        devs[path.strip("/")] = (ftype | int(mode, 8), (int(major), int(minor)))
        args = args[2:]

    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            entries[os.path.relpath(full, root)] = full

    w = Writer(sys.stdout.buffer)
    names = sorted(set(entries) | set(devs))
    for name in names:
        if name in devs:
            mode, rdev = devs[name]
            w.entry(name, mode, rdev=rdev)
            continue
        full = entries[name]
        st = os.lstat(full)
        mode = normal_mode(st)
        if stat.S_ISLNK(mode):
            w.entry(name, mode, os.readlink(full).encode())
        elif stat.S_ISREG(mode):
            with open(full, "rb") as f:
                w.entry(name, mode, f.read())
        else:
            w.entry(name, mode, nlink=2)
    w.trailer()


if __name__ == "__main__":
    main(sys.argv)
