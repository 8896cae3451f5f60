"""Which bytes a run trains on: the files found for a dataset, identified by their MD5s before training.

Both MNIST and Fashion-MNIST ship files of the same names, and a data root is
searched, so a folder of MNIST files happily "is" Fashion-MNIST unless someone
looks. `identify` looks, every run (hashing the files costs well under a
second: ~0.1 s for MNIST, ~0.4 s for the CIFAR-10 tarball):

* every file is one of this dataset's known files (the MD5 of the file as
  served, of its decompressed bytes, or of an extracted member): ``official``
  (``verified`` when the checksums are the config's ``data.md5``, not the registry's);
* any file is one of ANOTHER registered dataset's: a one-line `DataError`
  naming both datasets (it would train on the wrong data and record it under
  the wrong name);
* some files match nothing known (a subset such as the shared mnist-5k, a
  re-compressed copy, synthetic files): ``unknown``; one warning, and the run
  records it (an MLflow tag and the digest of the files), or, with
  ``data.verify_checksum=true``, a `DataError`;
* the user's own data (``npz``, ``image_folder``): ``own``, with its digest.

`Identity.tags` is what MLflow records (`dpcnn.outputs`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .idx import DatasetSpec, decompressed_md5, file_md5

log = logging.getLogger("dpcnn")

OFFICIAL, VERIFIED, UNKNOWN, OWN = "official", "verified", "unknown", "own"


@dataclass(frozen=True)
class Identity:
    """What the files of a run are: ``status`` (official / verified / unknown / own), the MD5 of every file
    (name relative to the folder searched -> md5) and one short digest over them all."""

    dataset: str
    status: str
    md5: dict = field(default_factory=dict)
    unknown: tuple = ()  # the files that match nothing known

    @property
    def digest(self) -> str:
        """16 hex digits over every (file, md5): the same files give the same digest on any machine."""
        text = "\n".join(f"{name} {md5}" for name, md5 in sorted(self.md5.items()))
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def tags(self) -> dict[str, str]:
        tags = {"dpcnn.data.identity": self.status, "dpcnn.data.files_digest": self.digest,
                "dpcnn.data.files_md5": " ".join(f"{n}={m}" for n, m in sorted(self.md5.items()))[:5000]}
        if self.unknown:
            tags["dpcnn.data.unknown_files"] = ", ".join(self.unknown)[:5000]
        return tags


def _known(registry: Mapping[str, DatasetSpec]) -> dict[str, tuple[str, str]]:
    """md5 -> (dataset, file name) over every checksum the registry knows."""
    table: dict[str, tuple[str, str]] = {}
    for spec in registry.values():
        for sums in (spec.md5, spec.raw_md5):
            for fname, md5 in sums.items():
                table.setdefault(md5, (spec.name, fname))
    return table


def _files(path: Path) -> list[Path]:
    """The file itself, or the regular files of a folder (an extracted archive), sorted."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [path]


def _owners(path: Path, spec: DatasetSpec, known: dict) -> tuple[str, set[tuple[str, str]]]:
    """(md5 of the file, the {(dataset, file)} it is known as); the decompressed MD5 is only computed
    when the file's own MD5 is not this dataset's."""
    md5 = file_md5(path)
    owners = {known[md5]} if md5 in known else set()
    mine = set(spec.md5.values()) | set(spec.raw_md5.values())
    if md5 not in mine and path.suffix == ".gz":
        raw = decompressed_md5(path)
        owners |= {known[raw]} if raw in known else set()
        owners |= {(spec.name, path.name)} if raw in mine else set()
    if md5 in mine:
        owners.add((spec.name, path.name))
    return md5, owners


def identify(spec: DatasetSpec, paths: Mapping[str, Path], registry: Mapping[str, DatasetSpec],
             strict: bool = False) -> Identity:
    """Identify the files found for ``spec`` (``{key: path}`` from `dpcnn.idx.ensure_files`).

    Raises `DataError` (one line, naming both datasets) for files of another
    registered dataset, and for unknown files when ``strict``; warns once for
    unknown files otherwise.
    """
    known = _known({**registry, spec.name: spec})
    md5s, unknown, foreign = {}, [], []
    found = [(f"{p.name}/{f.name}" if p.is_dir() else f.name, f) for p in map(Path, paths.values()) for f in _files(p)]
    for name, path in found:
        md5, owners = _owners(path, spec, known)
        md5s[name] = md5
        if any(d == spec.name for d, _ in owners):
            continue
        others = sorted({(d, f) for d, f in owners if d != spec.name})
        if others:
            foreign.append((path, others[0]))
        elif not name.endswith(".txt"):  # batches.meta.txt: the class names, not data
            unknown.append(name)
    if foreign:
        path, (other, fname) = foreign[0]
        raise DataError(f"{path} is {other}'s {fname} (by its MD5), not {spec.name}'s: these files are the "
                        f"{other} dataset; train on them with data={other}, or point DPCNN_DATA_DIR (or "
                        f"data.root) at the {spec.name} files")
    if unknown and (spec.md5 or spec.raw_md5):
        where = Path(next(iter(paths.values()))).parent
        what = (f"{len(unknown)} of the {spec.name} files in {where} match no known copy ({', '.join(unknown)}): "
                "a subset, a re-compressed or a made-up copy")
        if strict:
            raise DataError(f"{what}; data.verify_checksum=true accepts only the official files: delete them to "
                            "re-download, or set data.verify_checksum=false to train on them anyway")
        log.warning("%s; training on them as %s, recorded in MLflow (tag dpcnn.data.identity=unknown)",
                    what, spec.name)
    registered = registry.get(spec.name)
    official = registered is not None and (spec.md5, spec.raw_md5) == (registered.md5, registered.raw_md5)
    status = UNKNOWN if unknown or not (spec.md5 or spec.raw_md5) else OFFICIAL if official else VERIFIED
    return Identity(spec.name, status, md5s, tuple(unknown))


def own_identity(name: str, md5s: Mapping[str, str]) -> Identity:
    """The identity of the user's own data (an .npz, an image folder): the MD5 of its files."""
    return Identity(name, OWN, dict(md5s))
