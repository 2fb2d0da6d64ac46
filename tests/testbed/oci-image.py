#!/usr/bin/env python3
"""oci-image.py OUT.tar NAME:TAG FILE:PATH[:MODE]... [--entrypoint PATH] [--user UID:GID]

Writes a one-layer OCI image archive (an oci-layout tarball, as `ctr images import` reads it) holding the given
files, for images the bed needs that no registry serves here (the pod sandbox's pause image). No daemon, no mounts.
"""
import hashlib, io, json, sys, tarfile


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def main(argv):
    out, ref, *rest = argv
    entrypoint, user, files = None, "", []
    it = iter(rest)
    for arg in it:
        if arg == "--entrypoint":
            entrypoint = next(it)
        elif arg == "--user":
            user = next(it)
        else:
            src, path, *mode = arg.split(":")
            files.append((src, path.lstrip("/"), int(mode[0], 8) if mode else 0o755))
    layer_io = io.BytesIO()
    with tarfile.open(fileobj=layer_io, mode="w", format=tarfile.PAX_FORMAT) as layer:
        for src, path, mode in files:
            data = open(src, "rb").read()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, 0
            layer.addfile(info, io.BytesIO(data))
    layer_digest, layer_data = blob(layer_io.getvalue())
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": [entrypoint] if entrypoint else None, "User": user},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    config_digest, config_data = blob(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config_data)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                    "size": len(layer_data)}],
    }
    manifest_digest, manifest_data = blob(json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
        "size": len(manifest_data), "annotations": {"io.containerd.image.name": ref,
                                                     "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1]}}]}
    with tarfile.open(out, "w") as archive:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            archive.addfile(info, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps(index).encode())
        for digest, data in ((layer_digest, layer_data), (config_digest, config_data), (manifest_digest, manifest_data)):
            add("blobs/sha256/" + digest.split(":")[1], data)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1:])
