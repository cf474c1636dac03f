#!/usr/bin/env python3
"""Writes a one-layer OCI image archive (image-layout tar) FROM scratch.

    oci.py broker|operator BINARY VERSION OUTDIR

writes OUTDIR/<name>.oci.tar (for `ctr -n k8s.io images import`; the image is named
by the io.containerd.image.name annotation) and OUTDIR/<name>-rootfs.tar.gz (the same
layer, for the Containerfiles). Deterministic: fixed mtimes, numeric owners, sorted entries,
gzip without a timestamp. Keep IMAGES in sync with images/*.Containerfile.
"""

import gzip
import hashlib
import io
import json
import sys
import tarfile

UID = 65532
EXPOSE = ["16000/tcp", "16000/udp", "16001/tcp", "16002/tcp"]
IMAGES = {
    "broker": {
        "name": "eventtermq",
        "entrypoint": ["/eventtermq"],
        "cmd": ["--dir", "/data"],
        "user": f"{UID}:{UID}",
        "ports": EXPOSE,
        "volumes": ["/data"],
    },
    "operator": {
        "name": "eventter-operator",
        "entrypoint": ["/eventter-operator"],
        "cmd": [],
        "user": f"{UID}:{UID}",
        "ports": [],
        "volumes": [],
    },
}
ETC = {
    "etc/passwd": f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{UID}:{UID}:nonroot:/nonexistent:/sbin/nologin\n",
    "etc/group": f"root:x:0:\nnonroot:x:{UID}:\n",
    # Static glibc has the files and dns services built in.
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    # For runtimes that do not mount one (Kubernetes and Docker do): the CLI's default
    # --host is localhost.
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
}


def entry(name, kind=tarfile.REGTYPE, mode=0o644, uid=0, size=0):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.size = kind, mode, uid, uid, size
    info.mtime, info.uname, info.gname = 0, "", ""
    return info


def tar_bytes(entries):
    """entries: (TarInfo, bytes or None), written sorted by name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in sorted(entries, key=lambda e: e[0].name):
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def layer(spec, binary):
    with open(binary, "rb") as f:
        exe = f.read()
    d = tarfile.DIRTYPE
    entries = [
        (entry(spec["entrypoint"][0].lstrip("/"), mode=0o755, size=len(exe)), exe),
        (entry("etc", d, 0o755), None),
        (entry("tmp", d, 0o1777), None),
    ]
    entries += [(entry(p, size=len(t.encode())), t.encode()) for p, t in ETC.items()]
    entries += [(entry(v.lstrip("/"), d, 0o700, UID), None) for v in spec["volumes"]]
    return tar_bytes(entries)


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def main():
    kind, binary, version, outdir = sys.argv[1:]
    spec = IMAGES[kind]
    name = spec["name"]
    labels = {
        "org.opencontainers.image.title": name,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    diff = layer(spec, binary)
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=6) as z:
        z.write(diff)
    layer_digest, layer_gz = blob(gz.getvalue())
    with open(f"{outdir}/{name}-rootfs.tar.gz", "wb") as f:
        f.write(layer_gz)

    config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": spec["user"],
            "Entrypoint": spec["entrypoint"],
            "Cmd": spec["cmd"] or None,
            "Env": ["PATH=/"],
            "WorkingDir": "/",
            "ExposedPorts": {p: {} for p in spec["ports"]} or None,
            "Volumes": {v: {} for v in spec["volumes"]} or None,
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [blob(diff)[0]]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "images/oci.py"}],
    }
    config["config"] = {k: v for k, v in config["config"].items() if v is not None}
    config_digest, config_json = blob(to_json(config))
    manifest_digest, manifest_json = blob(to_json({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config_json)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": len(layer_gz)}],
        "annotations": labels,
    }))
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": len(manifest_json),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": f"localhost/{name}:{version}",
                "org.opencontainers.image.ref.name": version,
            },
        }],
    }

    d = tarfile.DIRTYPE
    files = {"oci-layout": to_json({"imageLayoutVersion": "1.0.0"}), "index.json": to_json(index)}
    for digest, data in [(config_digest, config_json), (manifest_digest, manifest_json),
                         (layer_digest, layer_gz)]:
        files["blobs/sha256/" + digest.split(":")[1]] = data
    entries = [(entry("blobs", d, 0o755), None), (entry("blobs/sha256", d, 0o755), None)]
    entries += [(entry(p, size=len(data)), data) for p, data in files.items()]
    with open(f"{outdir}/{name}.oci.tar", "wb") as f:
        f.write(tar_bytes(entries))
    print(f"{outdir}/{name}.oci.tar: localhost/{name}:{version} {manifest_digest}")


def to_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


if __name__ == "__main__":
    main()
