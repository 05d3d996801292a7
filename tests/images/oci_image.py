#!/usr/bin/env python3
"""Builds a single-layer OCI image tarball (OCI image layout) from a few files.

No registry is reachable from the test hosts, so test images are assembled
here from static binaries. The output is reproducible: fixed mtimes, fixed
owners, sorted entries, gzip without name or timestamp; the same inputs give
the same digests.

Usage:
  oci_image.py busybox <busybox-binary> <image-name> <out.tar>
  oci_image.py pause <pause-binary> <image-name> <out.tar>
  oci_image.py installer <payload-dir> <image-name> <out.tar>
"""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

# Fixed timestamp for every entry (SOURCE_DATE_EPOCH convention).
EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class Tree:
    """An in-memory rootfs: path -> (kind, mode, data-or-target)."""

    def __init__(self):
        self.entries = {}

    def dir(self, path, mode=0o755):
        self.entries[path] = ("dir", mode, None)

    def file(self, path, data, mode=0o644):
        self.entries[path] = ("file", mode, data)

    def symlink(self, path, target):
        self.entries[path] = ("symlink", 0o777, target)

    def tar_bytes(self):
        """A POSIX tar of the tree, parents before children, sorted."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                kind, mode, data = self.entries[path]
                info = tarfile.TarInfo(path)
                info.mtime = EPOCH
                info.mode = mode
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif kind == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = data
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()


def base_tree():
    """Directories and account files every test image has."""
    tree = Tree()
    for d in ("bin", "dev", "etc", "proc", "sys", "root", "var"):
        tree.dir(d)
    tree.dir("tmp", 0o1777)
    tree.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
              b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    tree.file("etc/group", b"root:x:0:\nnobody:x:65534:\n")
    return tree


def busybox_tree(binary):
    tree = base_tree()
    tree.dir("usr")
    tree.dir("usr/bin")
    tree.dir("sbin")
    with open(binary, "rb") as f:
        tree.file("bin/busybox", f.read(), 0o755)
    # Every applet this busybox has, as /bin/<applet> -> busybox; the list
    # comes from the binary itself (static, so it runs on the build host).
    applets = subprocess.run([binary, "--list"], check=True, capture_output=True,
                             text=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            tree.symlink(f"bin/{applet}", "busybox")
    return tree, {"Env": [PATH_ENV], "Cmd": ["sh"]}


def pause_tree(binary):
    tree = base_tree()
    with open(binary, "rb") as f:
        tree.file("pause", f.read(), 0o755)
    return tree, {"Env": [PATH_ENV], "Entrypoint": ["/pause"]}


# Where the node installer image keeps its payload: clh-install finds it
# above its own bin/ (packaging/build-node-image.sh).
INSTALLER_PAYLOAD = "opt/clh-shim-payload"


def installer_tree(payload):
    """The node installer: a static clh-install and the payload it installs,
    no libc, no shell. The DaemonSet mounts the host's / at /host."""
    tree = base_tree()
    tree.dir("host")
    tree.dir("opt")
    tree.dir(INSTALLER_PAYLOAD)
    for dirpath, dirnames, filenames in os.walk(payload):
        rel = os.path.relpath(dirpath, payload)
        base = INSTALLER_PAYLOAD if rel == "." else f"{INSTALLER_PAYLOAD}/{rel}"
        for d in dirnames:
            tree.dir(f"{base}/{d}")
        for name in filenames:
            path = os.path.join(dirpath, name)
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            with open(path, "rb") as f:
                tree.file(f"{base}/{name}", f.read(), mode)
    entry = f"/{INSTALLER_PAYLOAD}/bin/clh-install"
    return tree, {"Entrypoint": [entry], "Cmd": ["daemonset", "--host-root", "/host"]}


def gzip_bytes(data):
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header reproducible.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build(tree, image_config, name, out):
    layer_tar = tree.tar_bytes()
    layer = gzip_bytes(layer_tar)
    config = canonical_json({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer_tar)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "clh-shim tests/images"}],
    })
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": MT_LAYER, "digest": sha256(layer), "size": len(layer)}],
    })
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = canonical_json({
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": sha256(manifest),
            "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            # containerd's importer names the image after io.containerd.image.name
            # (1.6 and 2.x); the OCI ref name is the tag, for --base-name and
            # other OCI tools.
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    })
    blobs = {sha256(b).split(":")[1]: b for b in (layer, config, manifest)}
    outer = Tree()
    outer.dir("blobs")
    outer.dir("blobs/sha256")
    for digest, data in blobs.items():
        outer.file(f"blobs/sha256/{digest}", data)
    outer.file("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
    outer.file("index.json", index)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(outer.tar_bytes())
    os.replace(tmp, out)
    print(f"{out}: {name} manifest {sha256(manifest)}")


def main(argv):
    trees = {"busybox": busybox_tree, "pause": pause_tree, "installer": installer_tree}
    if len(argv) != 5 or argv[1] not in trees:
        sys.exit(__doc__)
    kind, source, name, out = argv[1:]
    tree, image_config = trees[kind](source)
    build(tree, image_config, name, out)


if __name__ == "__main__":
    main(sys.argv)
