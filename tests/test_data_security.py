"""Hostile inputs: malicious pickles, escaping archive members, decompression bombs, and fuzzed
(corrupted / truncated) files that must only ever raise DataError."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vggkit.data import load_dataset
from vggkit.data import testing as T
from vggkit.data.archive import extract_tar
from vggkit.data.safepickle import MAX_DEPTH, restricted_loads
from vggkit.data.sources.cifar import CIFAR10, load_cifar, parse_batch, parse_meta
from vggkit.data.sources.idx import read_idx_bytes
from vggkit.data.sources.npz import load_npz
from vggkit.errors import DataError

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (str(self.marker),))


# --- restricted unpickler ---------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["bare", "in-dict", "as-labels"])
def test_malicious_pickle_is_rejected_without_running(tmp_path: Path, wrap: str) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil(marker)
    obj = {"bare": evil, "in-dict": {"data": evil, "labels": [1]},
           "as-labels": {"data": np.zeros((1, 3072), np.uint8), "labels": evil}}[wrap]
    members, _ = T.cifar10_files()
    members[f"{CIFAR10.folder}/data_batch_2"] = pickle.dumps(obj, protocol=2)
    for name, blob in members.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(blob)
    with pytest.raises(DataError, match=r"data_batch_2: not a readable CIFAR batch file .*global posix\.mkdir is not allowed"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1+1'\ntR.",
    b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.",
    b"\x80\x02cnumpy\nload\n.",
    b"\x80\x02cnumpy.ma.core\nMaskedArray\n.",
    b"\x80\x02cnumpy.core.multiarray\nscalar\n.",
])
def test_restricted_unpickler_refuses_other_globals(payload: bytes) -> None:
    with pytest.raises(pickle.UnpicklingError, match="is not allowed"):
        restricted_loads(payload)


def test_restricted_unpickler_refuses_object_dtype() -> None:
    blob = pickle.dumps({"data": np.array([1, "x"], dtype=object)}, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        restricted_loads(blob)


def test_restricted_unpickler_checks_byte_count() -> None:
    blob = T.py2_pickle({"data": np.zeros((2, 3), np.uint8)}).replace(b"K\x02K\x03", b"K\x09K\x09")
    with pytest.raises(pickle.UnpicklingError, match="needs 81"):
        restricted_loads(blob)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_restricted_unpickler_reads_python3_pickles(protocol: int) -> None:
    data = np.arange(3072 * 2, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    x, y = parse_batch(pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=protocol), "b")
    assert np.array_equal(x.reshape(2, -1), data) and y.tolist() == [3, 4]


def test_lying_lengths_do_not_allocate() -> None:
    """A flipped length byte must not make the unpickler allocate what it claims."""
    huge_bytearray = b"\x80\x05\x96" + (1 << 40).to_bytes(8, "little") + b"abc."
    with pytest.raises(pickle.UnpicklingError, match="truncated"):
        restricted_loads(huge_bytearray)
    # A memo index near 2**32: the C unpickler would size its memo array to match.
    huge_memo = b"\x80\x02]r\xff\xff\xff\x7f."
    assert restricted_loads(huge_memo) == []


def test_shared_subobjects_are_materialised_once() -> None:
    """A 'billion laughs' graph (each level references the previous one twice) loads quickly."""
    blob = bytearray(b"\x80\x02]q\x00")  # level 0: []
    for level in range(1, 40):
        blob += b"](h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"eq" + bytes([level])
    out = restricted_loads(bytes(blob) + b".")  # 2**39 paths, 40 distinct lists
    assert isinstance(out, list) and out[0] is out[1]


@pytest.mark.parametrize("blob", [
    b"\x80\x02(K\x01\x85K\x02d.",  # DICT
    b"\x80\x02}K\x01\x85K\x02s.",  # SETITEM
    b"\x80\x02}(K\x01\x85K\x02u.",  # SETITEMS
], ids=["DICT", "SETITEM", "SETITEMS"])
def test_tuple_dict_keys_are_refused_on_every_dict_opcode(blob: bytes) -> None:
    with pytest.raises(pickle.UnpicklingError, match="dict keys must be strings or integers"):
        restricted_loads(blob)  # {(1,): 2}


@pytest.mark.parametrize("blob,what", [
    (b"\x80\x04\x8f(K\x01\x85\x90.", "a set"),  # EMPTY_SET, ADDITEMS
    (b"\x80\x04(K\x01\x85\x91.", "a frozenset"),  # FROZENSET
])
def test_sets_are_refused(blob: bytes, what: str) -> None:
    with pytest.raises(pickle.UnpicklingError, match=f"{what} is not allowed"):
        restricted_loads(blob)


# Pickles nesting containers n deep, one per opcode that builds or fills a container.
_NESTERS = {
    "TUPLE1": lambda n: b")" + b"\x85" * (n - 1),
    "TUPLE2": lambda n: b")" + b"N\x86" * (n - 1),
    "TUPLE3": lambda n: b")" + b"NN\x87" * (n - 1),
    "TUPLE": lambda n: b"(" * (n - 1) + b")" + b"t" * (n - 1),
    "LIST": lambda n: b"(" * (n - 1) + b"]" + b"l" * (n - 1),
    "DICT": lambda n: b"(K\x01" * (n - 1) + b"}" + b"d" * (n - 1),
    "APPEND": lambda n: b"]" * n + b"a" * (n - 1),
    "APPENDS": lambda n: b"](" * (n - 1) + b"]" + b"e" * (n - 1),
    "SETITEM": lambda n: b"}K\x01" * (n - 1) + b"}" + b"s" * (n - 1),
    "SETITEMS": lambda n: b"}(K\x01" * (n - 1) + b"}" + b"u" * (n - 1),
}


@pytest.mark.parametrize("opcode", list(_NESTERS))
def test_nesting_depth_is_bounded_while_building(opcode: str) -> None:
    """MAX_DEPTH levels load; one more is refused by the opcode that builds it (the check after
    loading would let it through, and it must never see a deep structure at all)."""
    nest = _NESTERS[opcode]
    out = restricted_loads(b"\x80\x02" + nest(MAX_DEPTH) + b".")
    for _ in range(MAX_DEPTH - 1):
        (out,) = out.values() if isinstance(out, dict) else out[:1]
    assert not out
    with pytest.raises(pickle.UnpicklingError, match=f"nested deeper than {MAX_DEPTH} levels"):
        restricted_loads(b"\x80\x02" + nest(MAX_DEPTH + 1) + b".")


def test_marks_nest_no_deeper_than_containers() -> None:
    """Each open MARK holds a list: three million of them would take about 200 MB."""
    restricted_loads(b"(" * (MAX_DEPTH - 1) + b")" + b"t" * (MAX_DEPTH - 1) + b".")
    with pytest.raises(pickle.UnpicklingError, match=f"nested deeper than {MAX_DEPTH} levels"):
        restricted_loads(b"(" * 3_000_000 + b".")


@pytest.mark.parametrize("blob", [
    b"\x80\x02]q\x00h\x00a.",  # l.append(l)
    b"\x80\x02]q\x00]q\x01h\x00h\x01ah\x01h\x00a.",  # a.append(b); b.append(a)
    b"\x80\x02}q\x00]q\x01h\x00K\x01h\x01sh\x01K\x02a.",  # d[1] = l; l.append(2)
])
def test_filling_a_nested_container_is_refused(blob: bytes) -> None:
    with pytest.raises(pickle.UnpicklingError, match="filled after being nested"):
        restricted_loads(blob)


def test_deep_tuple_as_dict_key_is_a_data_error_not_a_crash(tmp_path: Path) -> None:
    """The issue's payload: a 3-million-deep tuple as a DICT key. Hashing it segfaulted CPython;
    run in a child so that a regression shows as its exit code, not as a dead test run."""
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"()" + b"\x85" * 3_000_000 + b"Nd.")
    code = textwrap.dedent(f"""
        from pathlib import Path
        from vggkit.data.sources.cifar import parse_batch
        from vggkit.errors import DataError
        try:
            parse_batch(Path({str(path)!r}).read_bytes(), "data_batch_1")
        except DataError as exc:
            print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("data_batch_1: not a readable CIFAR batch file")
    assert f"nested deeper than {MAX_DEPTH} levels" in proc.stdout


# --- archives ---------------------------------------------------------------------------------

def _tar_with(path: Path, member: tarfile.TarInfo, payload: bytes = b"") -> None:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"hi"))
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = 3 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("member,why", [
    (_member("/etc/evil"), "an absolute path"),
    (_member("cifar-10-batches-py/../../evil"), "'..' path component"),
    (_member("cifar-10-batches-py/link", tarfile.SYMTYPE, "../../etc/passwd"), "pointing outside"),
    (_member("cifar-10-batches-py/abs", tarfile.SYMTYPE, "/etc/passwd"), "absolute path"),
    (_member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "../outside"), "pointing outside"),
    (_member("cifar-10-batches-py/dev", tarfile.CHRTYPE), "device"),
])
def test_tar_members_escaping_are_refused(tmp_path: Path, member: tarfile.TarInfo, why: str) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    _tar_with(archive, member, b"bad")
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(DataError, match=rf"cifar-10-python\.tar\.gz: refusing archive member .*{why}"):
        extract_tar(archive, dest, "cifar-10-batches-py")
    assert list(dest.iterdir()) == [], "nothing extracted, no temporary folder left"
    with pytest.raises(DataError, match="refusing archive member"):
        load_cifar(archive, CIFAR10)  # reading straight from the archive checks members too


def test_symlink_inside_archive_is_allowed(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    _tar_with(archive, _member("cifar-10-batches-py/alias", tarfile.SYMTYPE, "readme.html"))
    dest = tmp_path / "out"
    dest.mkdir()
    out = extract_tar(archive, dest, "cifar-10-batches-py")
    assert (out / "alias").read_bytes() == b"hi"


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "s.zip"
    T.write_image_folder(src, as_zip=True)
    with zipfile.ZipFile(src, "a") as zf:
        info = zipfile.ZipInfo("train/cat/link.png")
        info.create_system = 3
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match=r"refusing archive member 'train/cat/link\.png': a symbolic link"):
        load_dataset(f"folder:{src}", data_dir=tmp_path / "d")


def _zip_with_member(path: Path, name: str, size: int, method: int = zipfile.ZIP_DEFLATED) -> None:
    """A zipped image folder plus member ``name`` of ``size`` zero bytes, streamed in (never
    held in memory)."""
    T.write_image_folder(path, as_zip=True)
    info = zipfile.ZipInfo(name)
    info.compress_type = method
    with zipfile.ZipFile(path, "a") as zf, zf.open(info, "w") as out:
        for _ in range(size >> 20):
            out.write(bytes(1 << 20))


def _claim_size(path: Path, name: str, size: int) -> None:
    """Make the local and central headers of member ``name`` claim ``size`` bytes uncompressed."""
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        struct.pack_into("<I", blob, zf.getinfo(name).header_offset + 22, size)
    pos = blob.find(b"PK\x01\x02")
    while pos >= 0:
        (name_len,) = struct.unpack_from("<H", blob, pos + 28)
        if blob[pos + 46:pos + 46 + name_len] == name.encode():
            struct.pack_into("<I", blob, pos + 24, size)
        pos = blob.find(b"PK\x01\x02", pos + 1)
    path.write_bytes(bytes(blob))


_BOMB = "train/cat/zz-bomb.png"


@pytest.mark.parametrize("header,reason", [
    ("honest", r"refusing to inflate 200 MiB, over the 64 MiB limit for one image\)"),
    ("lying", r"Bad CRC-32"),  # claims 1000 bytes: inflating stops there, and the CRC is wrong
])
def test_zip_bomb_is_refused_with_bounded_memory(tmp_path: Path, header: str, reason: str) -> None:
    """A 200 MiB deflate bomb (about 200 KB zipped) among a folder dataset's images: a DataError
    naming the zip and member, and the loading process grows by a few MiB, not 200."""
    src = tmp_path / "bomb.zip"
    _zip_with_member(src, _BOMB, 200 << 20)
    assert src.stat().st_size < 1 << 20
    if header == "lying":
        _claim_size(src, _BOMB, 1000)
    code = textwrap.dedent(f"""
        import resource
        from vggkit.data import load_dataset
        from vggkit.errors import DataError

        # A safety net should the bound fail: the child dies, not the machine.
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) << 10
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_dataset("folder:{src}", data_dir={str(tmp_path / "d")!r}, progress=False)
        except DataError as exc:
            print(exc)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) >> 10)  # KiB -> MiB
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    message, grown_mib = proc.stdout.strip().splitlines()
    assert re.match(rf"{re.escape(str(src))}:{_BOMB}: cannot read \({reason}", message), message
    assert int(grown_mib) < 32, f"peak RSS grew by {grown_mib} MiB"


def test_zip_reader_stops_at_the_limit_whatever_the_header(tmp_path: Path, monkeypatch) -> None:
    """With the header checks off, the chunked reader alone stops just past the limit."""
    from vggkit.data.sources import folder

    src = tmp_path / "big.zip"
    _zip_with_member(src, _BOMB, 16 << 20)
    monkeypatch.setattr(folder, "MAX_MEMBER_BYTES", 4 << 20)
    monkeypatch.setattr(folder, "_check_zip_member_size", lambda info: None)
    chunks: list[int] = []
    real_read = zipfile.ZipExtFile.read
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: chunks.append(n) or real_read(self, n))
    with zipfile.ZipFile(src) as zf, pytest.raises(folder.ZipMemberRefused, match="inflates past the 4 MiB limit"):
        folder._read_zip_member(zf, zf.getinfo(_BOMB))
    assert len(chunks) == 5 and all(0 < n <= 1 << 20 for n in chunks)


@pytest.mark.parametrize("size,method,reason", [
    (2 << 20, zipfile.ZIP_DEFLATED, r"refusing to inflate [\d,]+ bytes into 2 MiB \(over 100:1"),
    (1 << 20, zipfile.ZIP_BZIP2, r"compressed with zip method 12, whose output vggkit cannot bound"),
])
def test_zip_members_over_the_ratio_or_of_unbounded_methods_are_refused(
        tmp_path: Path, size: int, method: int, reason: str) -> None:
    src = tmp_path / "s.zip"
    _zip_with_member(src, _BOMB, size, method)
    with pytest.raises(DataError, match=rf"s\.zip:{_BOMB}: cannot read \({reason}"):
        load_dataset(f"folder:{src}", data_dir=tmp_path / "d", progress=False)
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d2", skip_bad_images=True, progress=False)
    assert len(ds.skipped) == 1


def test_small_members_may_compress_any_amount(tmp_path: Path) -> None:
    """A blank BMP deflates far past 100:1; under RATIO_CHECK_ABOVE that is allowed."""
    from PIL import Image

    from vggkit.data.sources.folder import MAX_MEMBER_RATIO, RATIO_CHECK_ABOVE

    src = tmp_path / "s.zip"
    T.write_image_folder(src, as_zip=True, size=(64, 64))
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="BMP")
    with zipfile.ZipFile(src, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/cat/blank.bmp", buf.getvalue())
        info = zf.getinfo("train/cat/blank.bmp")
    assert info.file_size > MAX_MEMBER_RATIO * info.compress_size and info.file_size < RATIO_CHECK_ABOVE
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d", progress=False)
    assert not ds.skipped and (ds.x_train == 0).all(axis=(1, 2, 3)).sum() == 1


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_decompression_bomb_limit_stays_on(tmp_path: Path) -> None:
    from PIL import Image

    import vggkit.data.sources.folder  # noqa: F401 - importing must not lift the limit

    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    src = tmp_path / "bomb"
    T.write_image_folder(src)
    (src / "train" / "cat" / "bomb.png").write_bytes(_png_header_only(30_000, 30_000))
    with pytest.raises(DataError, match=r"bomb\.png: corrupt image \(DecompressionBombError"):
        load_dataset(f"folder:{src}", data_dir=tmp_path / "d")
    ds = load_dataset(f"folder:{src}", data_dir=tmp_path / "d", skip_bad_images=True)
    assert len(ds.skipped) == 1


def test_gzip_bomb_in_idx_is_bounded() -> None:
    """A tiny header followed by a huge run of zeros is rejected after reading one extra byte."""
    blob = gzip.compress(T.idx_bytes(np.zeros(10, np.uint8)) + b"\0" * (64 << 20), mtime=0)
    assert len(blob) < 200_000
    with pytest.raises(DataError, match="wrong length"):
        read_idx_bytes(blob, "bomb.gz")


# --- fuzzing: corrupted and truncated files only ever raise DataError --------------------------

def _mutate(data: bytes, draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "splice", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=400))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if kind == "flip" and buf:
            buf[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif buf:
            end = draw(st.integers(pos, min(len(buf), pos + 64)))
            buf[pos:end] = draw(st.binary(max_size=8))
    return bytes(buf)


@st.composite
def _corrupted(draw: st.DrawFn, valid: list[bytes]) -> bytes:
    return _mutate(draw(st.sampled_from(valid)), draw)


_IDX_VALID = [T.idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)), T.idx_bytes(np.arange(7, dtype=np.uint8))]
_IDX_VALID += [gzip.compress(b, mtime=0) for b in _IDX_VALID]


@FUZZ
@given(_corrupted(_IDX_VALID))
def test_fuzz_idx_reader(blob: bytes) -> None:
    try:
        arr = read_idx_bytes(blob, "fuzz.idx")
    except DataError:
        return
    assert arr.dtype == np.uint8 and arr.size == int(np.prod(arr.shape))


_SMALL = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
_BATCH_VALID = [
    T.py2_pickle({"data": _SMALL, "labels": [1, 2], "batch_label": "x"}),
    pickle.dumps({"data": _SMALL, "labels": [1, 2]}, protocol=2),
    pickle.dumps({"data": _SMALL, "labels": [1, 2]}, protocol=5),
    T.py2_pickle({"label_names": ["a", "b"]}),
]


@FUZZ
@given(_corrupted(_BATCH_VALID))
def test_fuzz_cifar_batch_reader(blob: bytes) -> None:
    for parse in (lambda b: parse_batch(b, "fuzz_batch"), lambda b: parse_meta(b, "fuzz_meta", "label_names")):
        try:
            parse(blob)
        except DataError:
            pass


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


_NPZ_VALID = [
    _npz_bytes(x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.array([0, 1]), x_test=np.ones((1, 4, 4), np.uint8),
               y_test=np.array([1])),
    _npz_bytes(x_train=np.zeros((2, 4, 4, 3), np.float32), y_train=np.array([[0], [1]]),
               x_test=np.ones((1, 4, 4, 3), np.float32), y_test=np.array([[1]])),
]


@FUZZ
@given(_corrupted(_NPZ_VALID))
def test_fuzz_npz_reader(blob: bytes) -> None:
    try:
        load_npz(Path("fuzz.npz"), data=blob)
    except DataError:
        pass


_TAR_VALID = [T.cifar_archive_bytes()[0]]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_corrupted(_TAR_VALID))
def test_fuzz_cifar_archive(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cifar-10-python.tar.gz"
        path.write_bytes(blob)
        try:
            load_cifar(path, CIFAR10)
        except DataError:
            pass


def test_every_truncation_of_a_cifar_archive() -> None:
    blob = T.cifar_archive_bytes()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.tar.gz"
        for cut in range(0, len(blob) - 1, max(1, len(blob) // 40)):
            path.write_bytes(blob[:cut])
            with pytest.raises(DataError, match=r"c\.tar\.gz"):
                load_cifar(path, CIFAR10)
