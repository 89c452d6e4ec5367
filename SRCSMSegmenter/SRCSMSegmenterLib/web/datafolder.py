"""The one folder the web page may read and write: confined paths, limited uploads, reserved names.

Why a class of its own: a web page is driven by whoever can reach the port, so every path it sends is
untrusted. Everything the front end reads or writes goes through :class:`DataFolder`, which

* accepts only paths *relative* to the folder, without ``..``, and resolves symlinks before checking
  that the target is still inside (a link pointing out of the folder is refused, not followed);
* lists what can be loaded: NIfTI, NRRD, MetaImage files and DICOM series folders;
* stores uploads under ``uploads/`` with a sanitised, never-reused name, refusing files over the limit;
* reserves output names under a lock, so two browser tabs saving at the same moment never get the
  same file, and an existing file is replaced only when the caller says so (after asking the user).

Plain Python (no trame, no slicer), so it is tested on its own.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from ..errors import InputError
from ..image import IMAGE_SUFFIXES, atomic_output

#: Default upload limit (bytes): a 512×512×600 int16 CT is 315 MB uncompressed.
DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024
#: Sub-folder of the data folder that receives uploads.
UPLOAD_DIR = "uploads"
#: How deep the data folder is searched for volumes (the nnU-Net layout needs 2).
MAX_DEPTH = 3
#: Suffixes a DICOM file may have (many scanners write none; those folders are found by content).
_DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


def _is_volume_file(name: str) -> bool:
    low = name.lower()
    if low.endswith((".seg.nrrd", ".seg.nhdr")) or low.startswith("."):
        return False  # segmentations are results, not inputs; dot files are partial writes
    return low.endswith(IMAGE_SUFFIXES)


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM part-10 file has 'DICM' at byte 128 (checked on files without a known suffix)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


class DataFolder:
    """Confined access to ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise InputError(f"The data folder '{root}' does not exist or is not a folder. Create it, or pass "
                             f"an existing folder with --data.")
        self.root = root_path.resolve()
        if not os.access(self.root, os.W_OK):
            raise InputError(f"The data folder '{self.root}' is not writable, so results could not be saved "
                             f"there. Pass a writable folder with --data.")
        self.max_upload_bytes = int(max_upload_bytes)
        self._lock = threading.Lock()
        self._reserved: set[Path] = set()

    # ------------------------------------------------------------------------------- paths
    def resolve(self, relative: str) -> Path:
        """The absolute path of ``relative`` inside the folder; :class:`InputError` if it would leave it."""
        if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
            raise InputError("No file chosen. Pick a volume from the data folder list.")
        text = relative.replace("\\", "/")
        pure = PurePosixPath(text)
        if pure.is_absolute() or re.match(r"^[A-Za-z]:", text):
            raise InputError(f"'{relative}' is an absolute path. Only paths inside the data folder are allowed; "
                             f"pick a file from the list.")
        if ".." in pure.parts:
            raise InputError(f"'{relative}' goes up with '..', out of the data folder. Pick a file from the list.")
        candidate = self.root.joinpath(*pure.parts)
        resolved = candidate.resolve()  # follows symlinks: a link out of the folder is caught below
        if resolved != self.root and not resolved.is_relative_to(self.root):
            raise InputError(f"'{relative}' points outside the data folder (a symbolic link?). Copy the file "
                             f"into the data folder instead.")
        return resolved

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    # ----------------------------------------------------------------------------- listing
    def volumes(self) -> list[str]:
        """Loadable inputs, relative POSIX paths, sorted: image files and DICOM series folders."""
        found: list[str] = []
        for folder, dirs, files in self._walk():
            dicom = False
            for name in files:
                path = folder / name
                if _is_volume_file(name):
                    if self._inside(path):
                        found.append(self.relative(path))
                elif not dicom and (name.lower().endswith(_DICOM_SUFFIXES)
                                    or ("." not in name and _looks_like_dicom(path))):
                    dicom = True
            if dicom and folder != self.root and self._inside(folder):
                found.append(self.relative(folder) + "/")
        return sorted(found)

    def _walk(self) -> Iterator[tuple[Path, list[str], list[str]]]:
        for top, dirs, files in os.walk(self.root, followlinks=False):
            folder = Path(top)
            depth = len(folder.relative_to(self.root).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
            yield folder, dirs, sorted(files)

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.root)
        except OSError:
            return False

    # ----------------------------------------------------------------------------- uploads
    @staticmethod
    def safe_name(name: str) -> str:
        """A file name without folders or odd characters, keeping a known image suffix."""
        base = PurePosixPath(str(name).replace("\\", "/")).name
        base = _SAFE_NAME.sub("_", base).strip(" .")
        if not base or not _is_volume_file(base):
            raise InputError(f"'{name}' is not a volume file this page can load. Upload a NIfTI (.nii, .nii.gz), "
                             f"NRRD (.nrrd) or MetaImage (.mha) file; for DICOM, copy the series folder into "
                             f"the data folder and pick it from the list.")
        return base

    def check_upload_size(self, name: str, size: int) -> None:
        if size > self.max_upload_bytes:
            raise InputError(
                f"'{name}' is {size / 2**20:.0f} MiB, over the upload limit of "
                f"{self.max_upload_bytes / 2**20:.0f} MiB. Copy it into the data folder and pick it from the "
                f"list, or start the server with a larger --max-upload-mb.")

    def save_upload(self, name: str, content: bytes) -> str:
        """Store an uploaded file under ``uploads/`` (never replacing one); returns its relative path."""
        self.check_upload_size(name, len(content))
        safe = self.safe_name(name)
        with self.reserve(Path(UPLOAD_DIR) / safe) as target:
            with atomic_output(target, overwrite=False) as tmp:
                tmp.write_bytes(content)
        return self.relative(target)

    # ----------------------------------------------------------------------------- outputs
    def output_path(self, name: str, suffix: str) -> Path:
        """Where the output ``name`` + ``suffix`` goes: the data folder itself, name sanitised."""
        base = _SAFE_NAME.sub("_", PurePosixPath(str(name).replace("\\", "/")).name).strip(" .")
        if not base:
            raise InputError(f"'{name}' is not a usable file name. Type a name such as 'case01_srcsm'.")
        return self.root / f"{base}{suffix}"

    def free_stem(self, stem: str, suffixes: tuple[str, ...]) -> str:
        """``stem``, or ``stem-2``, ``stem-3``… : the first whose files (every suffix) all do not exist."""
        base = self.output_path(stem, "").name
        n = 1
        while True:
            candidate = base if n == 1 else f"{base}-{n}"
            paths = [self.root / f"{candidate}{s}" for s in suffixes]
            with self._lock:
                if not any(p.exists() or p in self._reserved for p in paths):
                    return candidate
            n += 1

    @contextmanager
    def reserve(self, relative: Path | str, overwrite: bool = False) -> Iterator[Path]:
        """Hold the name ``relative`` (inside the folder) while it is written.

        A second writer of the same name meanwhile — another tab — is refused instead of racing; an
        existing file is refused unless ``overwrite``. For uploads (which must never replace a file)
        a taken name moves on to ``name-2`` and so on.
        """
        path = self.resolve(str(relative))
        with self._lock:
            if not overwrite and str(relative).startswith(UPLOAD_DIR):
                stem, suffix = _split_suffix(path.name)
                n = 1
                while path.exists() or path in self._reserved:
                    n += 1
                    path = path.with_name(f"{stem}-{n}{suffix}")
            if path in self._reserved:
                raise InputError(f"'{path.name}' is being written by another tab. Choose another name.")
            if path.exists() and not overwrite:
                raise InputError(f"'{path.name}' already exists in the data folder. Choose another name, or "
                                 f"confirm replacing it.")
            self._reserved.add(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield path
        finally:
            with self._lock:
                self._reserved.discard(path)


def _split_suffix(name: str) -> tuple[str, str]:
    low = name.lower()
    for s in sorted(IMAGE_SUFFIXES + (".seg.nrrd",), key=len, reverse=True):
        if low.endswith(s):
            return name[: -len(s)], name[-len(s):]
    return name, ""


__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "UPLOAD_DIR", "DataFolder"]
