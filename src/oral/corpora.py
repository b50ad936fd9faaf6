"""Plain-text corpora for continued pretraining: named embedded corpora or a local text file.

Each corpus is a list of documents (strings). Named corpora are read at run time from installed
packages, never copied into the repository:

    kjv            King James Bible, one document per chapter   (Debian bible-kjv)
    austen         Jane Austen's six novels, one per paragraph  (Debian r-cran-janeaustenr, R data)
    fortunes       fortune cookies, one document per fortune    (Debian fortunes, fortunes-min)
    python-stdlib  the Python standard library's source, one document per module (always there)

A local file (any path ending in .txt, or any existing file) is split into paragraphs on blank
lines. A named corpus is read from its package once and cached under $ORAL_HOME/corpora (remove
the cache file to read it again; a damaged one is read again by itself). `split_documents` gives
every corpus a fixed held-out part.
"""

import gzip
import hashlib
import io
import json
import logging
import lzma
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from oral.io import DamagedFileError, atomic_dir, atomic_write_bytes, file_lock
from oral.paths import oral_home

log = logging.getLogger(__name__)


class CorpusError(ValueError):
    """A corpus that does not exist, is not installed, or holds no text."""


FORTUNES_DIR = Path("/usr/share/games/fortunes")
R_LIBRARY_DIRS = [Path("/usr/lib/R/site-library/janeaustenr"), Path("/usr/share/R/site-library/janeaustenr")]
AUSTEN_NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
APT_FORTUNES = "apt-get install fortunes fortunes-min"
APT_BIBLE = "apt-get install bible-kjv"
# What a truncated or garbled compressed file raises (gzip, zlib, xz, tar).
_COMPRESSED_DAMAGE = (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError, tarfile.TarError)


def _austen_deb_candidates() -> list[Path]:
    return [Path(sys.prefix) / "share" / "janeaustenr.deb", oral_home() / "corpora" / "janeaustenr.deb"]


# -----------------------------------------------------------------------------
# KJV Bible


def _kjv() -> list[str]:
    """One document per chapter; verse references (`Ge1:1`) stripped, one verse per line."""
    exe = shutil.which("bible")
    if exe is None:
        raise CorpusError(f"the corpus 'kjv' needs the Debian package bible-kjv: run `{APT_BIBLE}`")
    out = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, check=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.decode("utf-8", errors="replace").splitlines():
        m = re.match(r"^(\w+?)(\d+):\d+\s+(.*)$", line)
        if m is None:  # a wrapped continuation line of the previous verse
            if chapters and line.strip():
                last = chapters[next(reversed(chapters))]
                last[-1] += " " + line.strip()
            continue
        book, chapter, text = m.groups()
        chapters.setdefault(f"{book}{chapter}", []).append(text.strip())
    return ["\n".join(verses) for verses in chapters.values()]


# -----------------------------------------------------------------------------
# Jane Austen (R package data: a lazy-load database of compressed serialized R objects)


def _deb_fix(deb_path: Path) -> str:
    return f"download it again: `apt-get download r-cran-janeaustenr && mv r-cran-janeaustenr_*.deb {deb_path}`"


def _ar_member(deb_path: Path, prefix: str) -> bytes:
    """The first member of a Debian `ar` archive whose name starts with `prefix`."""
    deb = deb_path.read_bytes()
    if not deb.startswith(b"!<arch>\n"):
        raise DamagedFileError(deb_path, "not a Debian package: no ar header", _deb_fix(deb_path))
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos : pos + 60]
        name = header[:16].decode(errors="replace").strip().rstrip("/")
        size = header[48:58].decode(errors="replace").strip()
        if not size.isdigit():
            raise DamagedFileError(deb_path, f"bad ar member header at byte {pos}", _deb_fix(deb_path))
        if name.startswith(prefix):
            return deb[pos + 60 : pos + 60 + int(size)]
        pos += 60 + int(size) + (int(size) % 2)
    raise DamagedFileError(deb_path, f"no {prefix}* member", _deb_fix(deb_path))


def _extract_austen_deb(deb_path: Path, dest: Path) -> None:
    """Extract janeaustenr's data/Rdata.{rdb,rdx} from the .deb into `dest` (atomically)."""
    with file_lock(dest.parent / ".janeaustenr.lock"):
        if (dest / "Rdata.rdx").exists():
            return
        try:
            _unpack_austen_data(deb_path, dest)
        except (*_COMPRESSED_DAMAGE, subprocess.CalledProcessError) as e:
            raise DamagedFileError(deb_path, f"cannot unpack: {e}", _deb_fix(deb_path)) from None


def _unpack_austen_data(deb_path: Path, dest: Path) -> None:
    """The unlocked body of `_extract_austen_deb`."""
    data_tar = _ar_member(deb_path, "data.tar")
    with atomic_dir(dest, overwrite=True) as tmp:
        try:
            with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as tar:
                for member in tar.getmembers():
                    if member.isfile() and re.search(r"janeaustenr/data/Rdata\.rd[bx]$", member.name):
                        (tmp / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        except tarfile.ReadError:  # a compression Python's tarfile lacks: let dpkg-deb do it
            if shutil.which("dpkg-deb") is None:
                raise CorpusError(f"cannot unpack {deb_path}: install dpkg or extract it by hand") from None
            subprocess.run(["dpkg-deb", "-x", str(deb_path), str(tmp / "x")], check=True)
            for f in (tmp / "x").rglob("Rdata.rd[bx]"):
                f.rename(tmp / f.name)
            shutil.rmtree(tmp / "x")
        if not (tmp / "Rdata.rdx").exists():
            raise CorpusError(f"{deb_path} holds no janeaustenr/data/Rdata.rdx")


def _austen_data_dir() -> Path:
    for d in R_LIBRARY_DIRS:
        if (d / "data" / "Rdata.rdx").exists():
            return d / "data"
    cache = oral_home() / "corpora" / "janeaustenr"
    if (cache / "Rdata.rdx").exists():
        return cache
    for deb in _austen_deb_candidates():
        if deb.is_file():
            _extract_austen_deb(deb, cache)
            return cache
    raise CorpusError(
        "the corpus 'austen' needs the Debian package r-cran-janeaustenr (only its data files): run "
        f"`apt-get download r-cran-janeaustenr && mv r-cran-janeaustenr_*.deb {_austen_deb_candidates()[0]}` "
        "(scripts/setup.sh does this), or `apt-get install r-cran-janeaustenr`"
    )


def _read_lazyload_db(data_dir: Path) -> dict[str, list[str]]:
    """Read an R lazy-load database (Rdata.rdx index + Rdata.rdb blobs) of character vectors."""
    import rdata

    def parse(raw: bytes):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": it is a bare serialization
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    if data_dir.is_relative_to(oral_home()):
        fix = f"delete {data_dir} (it is extracted again on next use)"
    else:
        fix = "reinstall it: `apt-get install --reinstall r-cran-janeaustenr`"
    try:
        index = parse(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    except _COMPRESSED_DAMAGE as e:
        raise DamagedFileError(data_dir / "Rdata.rdx", str(e), fix) from None
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset) : int(offset) + int(length)]
        # Each entry: a 4-byte big-endian uncompressed length, then a zlib stream.
        try:
            out[str(name)] = [str(s) for s in parse(zlib.decompress(chunk[4:]))]
        except _COMPRESSED_DAMAGE as e:
            raise DamagedFileError(data_dir / "Rdata.rdb", f"entry {name}: {e}", fix) from None
    return out


def _austen() -> list[str]:
    """One document per paragraph (lines joined, split on blank lines), novels in publication order."""
    novels = _read_lazyload_db(_austen_data_dir())
    docs = []
    for name in AUSTEN_NOVELS:
        paragraph: list[str] = []
        for line in novels[name] + [""]:
            if line.strip():
                paragraph.append(line.strip())
            elif paragraph:
                docs.append(" ".join(paragraph))
                paragraph = []
    return docs


# -----------------------------------------------------------------------------
# Fortunes and the Python standard library


def _fortunes() -> list[str]:
    """One document per fortune, across every fortune file (backspace overstrikes removed)."""
    files = sorted(p for p in FORTUNES_DIR.glob("*") if p.is_file() and p.suffix not in (".dat", ".u8"))
    if not files:
        raise CorpusError(f"the corpus 'fortunes' needs the Debian packages fortunes: run `{APT_FORTUNES}`")
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        text = re.sub(r".\x08", "", text)
        docs.extend(d.strip("\n") for d in text.split("\n%\n") if d.strip().strip("%"))
    return docs


def _python_stdlib() -> list[str]:
    """One document per module of the running Python's standard library (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(text)
    if not docs:
        raise CorpusError(f"the corpus 'python-stdlib' found no .py files under {root}")
    return docs


# -----------------------------------------------------------------------------
# Registry and entry points


@dataclass(frozen=True)
class EmbeddedCorpus:
    name: str
    description: str
    install: str
    load: Callable[[], list[str]]


CORPORA: dict[str, EmbeddedCorpus] = {
    "kjv": EmbeddedCorpus("kjv", "King James Bible, one document per chapter", APT_BIBLE, _kjv),
    "austen": EmbeddedCorpus(
        "austen",
        "Jane Austen's six novels, one document per paragraph",
        "apt-get download r-cran-janeaustenr (see scripts/setup.sh)",
        _austen,
    ),
    "fortunes": EmbeddedCorpus("fortunes", "fortune-cookie quotes and jokes, one per document", APT_FORTUNES, _fortunes),
    "python-stdlib": EmbeddedCorpus(
        "python-stdlib", "Python standard library source, one document per module", "(ships with Python)", _python_stdlib
    ),
}
ALIASES = {"bible": "kjv", "jane-austen": "austen", "python": "python-stdlib"}


def list_corpora() -> list[str]:
    """Names of the embedded corpora (installed or not; see `corpus_info`)."""
    return list(CORPORA)


def corpus_info() -> list[dict]:
    """Each embedded corpus with its description, whether it loads here, and its size."""
    rows = []
    for c in CORPORA.values():
        try:
            docs = _cached(c)
            row = {"available": True, "documents": len(docs), "chars": sum(map(len, docs))}
        except CorpusError as e:
            row = {"available": False, "error": str(e)}
        rows.append({"name": c.name, "description": c.description, "install": c.install, **row})
    return rows


def _local_file(path: Path) -> list[str]:
    if path.is_dir():
        raise CorpusError(f"{path} is a directory; give a text file (documents separated by blank lines)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorpusError(f"{path} is not UTF-8 text") from None
    docs = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not docs:
        raise CorpusError(f"corpus file {path} holds no text")
    return docs


def corpus_id(name_or_path: str | Path) -> str:
    """The id recorded in lineage: the embedded name, or a local file's path and content hash."""
    name = str(name_or_path)
    if name in CORPORA or name in ALIASES:
        return ALIASES.get(name, name)
    path = Path(name).expanduser()
    if path.is_file():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        return f"{path.resolve()}#sha256:{digest}"
    return name


def _cached(corpus: EmbeddedCorpus) -> list[str]:
    """A named corpus's documents, read from its package once, then from $ORAL_HOME/corpora/<name>.json.gz."""
    path = oral_home() / "corpora" / f"{corpus.name}.json.gz"
    if path.is_file():
        try:
            docs = json.loads(gzip.decompress(path.read_bytes()))["documents"]
            if isinstance(docs, list) and all(isinstance(d, str) for d in docs):
                return docs
            damage = "its documents are not a list of strings"
        except (*_COMPRESSED_DAMAGE, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            damage = f"{type(e).__name__}: {e}"
        log.warning("%s is damaged (%s); reading the corpus from its package again", path, damage)
    docs = corpus.load()
    blob = json.dumps({"name": corpus.name, "documents": docs}, ensure_ascii=False).encode("utf-8")
    atomic_write_bytes(path, gzip.compress(blob, mtime=0))
    return docs


def get_corpus(name_or_path: str | Path) -> list[str]:
    """The documents of a named embedded corpus or of a local text file (split on blank lines)."""
    name = str(name_or_path)
    if name in CORPORA or name in ALIASES:
        return _cached(CORPORA[ALIASES.get(name, name)])
    path = Path(name).expanduser()
    if path.exists():
        return _local_file(path)
    raise CorpusError(
        f"unknown corpus {name!r}: not one of {', '.join(CORPORA)} and not an existing file "
        "(give a path to a UTF-8 text file, documents separated by blank lines)"
    )


def split_documents(docs: list[str], heldout_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """A fixed (train, heldout) split by content hash: equal texts land on the same side.

    Independent of order and seed, so every version in a family is scored on the same held-out text.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    train, heldout = [], []
    for d in docs:
        bucket = int.from_bytes(hashlib.sha256(d.encode("utf-8")).digest()[:4], "big") / 2**32
        (heldout if bucket < heldout_fraction else train).append(d)
    if not train or not heldout:  # tiny corpora: keep one document out, the rest for training
        if len(docs) < 2:
            raise CorpusError(f"a corpus needs at least 2 documents to hold some out, got {len(docs)}")
        train, heldout = docs[:-1], docs[-1:]
    return train, heldout
