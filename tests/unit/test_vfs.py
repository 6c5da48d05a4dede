"""Unit tests for syncbit.fs.vfs: the pure tree of datasets and snapshots (no kernel)."""

from __future__ import annotations

import stat

import pytest

from syncbit.fs.vfs import ROOT_INODE, Vfs
from syncbit.model import FileEntry, Snapshot, short_hash


def entry(path: str, size: int = 3, mode: int = 0o444, mtime: float = 0.0, fo: str | None = None) -> FileEntry:
    return FileEntry(path=path, size=size, locator=path, validator="v", file_object=fo or short_hash(path, str(size)),
                     mode=mode, mtime=mtime)


def snap(*files: FileEntry, revision: str = "r1", created: float = 100.0) -> Snapshot:
    return Snapshot(uri="file:///data/set", revision=revision, files=tuple(files), created=created)


def walk(vfs: Vfs, path: str, parent: int = ROOT_INODE):
    node = vfs.node(parent)
    for part in path.split("/"):
        node = vfs.lookup(node.inode, part)
    return node


@pytest.fixture
def vfs():
    return Vfs()


def test_root_is_an_empty_directory(vfs):
    root = vfs.node(ROOT_INODE)
    assert root.is_dir and stat.S_ISDIR(root.mode)
    assert vfs.readdir(ROOT_INODE) == []
    assert vfs.datasets() == {}


def test_tree_building(vfs):
    s = snap(entry("README.md", 10), entry("weights/model-00001.safetensors", 1000, mode=0o555, mtime=5.0),
             entry("weights/model-00002.safetensors", 2000), entry("data/train/part-0.parquet", 7))
    assert vfs.set_dataset("llama", s) is None
    top = vfs.lookup(ROOT_INODE, "llama")
    assert top.is_dir and top.snapshot is s and top.dataset == "llama"
    assert [n for n, _ in vfs.readdir(top.inode)] == ["README.md", "data", "weights"]
    assert [n for n, _ in vfs.readdir(walk(vfs, "llama/weights").inode)] == [
        "model-00001.safetensors", "model-00002.safetensors"]
    f = walk(vfs, "llama/weights/model-00001.safetensors")
    assert not f.is_dir and f.size == 1000 and f.entry.path == "weights/model-00001.safetensors"
    assert f.mode == stat.S_IFREG | 0o555
    assert f.mtime == 5.0                     # the file's own mtime
    assert walk(vfs, "llama/README.md").mtime == 100.0  # no mtime: the snapshot's creation time
    d = walk(vfs, "llama/data/train")
    assert d.is_dir and d.size == 0 and d.mode == stat.S_IFDIR | 0o555
    assert vfs.datasets() == {"llama": s}


def test_inodes_are_unique_and_resolvable(vfs):
    vfs.set_dataset("a", snap(entry("x/y"), entry("x/z"), entry("w")))
    vfs.set_dataset("b", snap(entry("x/y")))
    seen = {}

    def visit(inode):
        for name, child in vfs.readdir(inode):
            assert child.inode not in seen
            seen[child.inode] = child
            assert vfs.node(child.inode) is child
            if child.is_dir:
                visit(child.inode)

    visit(ROOT_INODE)
    assert len(seen) == 2 + 4 + 2  # two tops, a/{x,y,z,w}, b/{x,y}
    assert ROOT_INODE not in seen


def test_lookup_errors(vfs):
    vfs.set_dataset("ds", snap(entry("dir/file")))
    top = vfs.lookup(ROOT_INODE, "ds")
    with pytest.raises(FileNotFoundError):
        vfs.lookup(ROOT_INODE, "other")
    with pytest.raises(FileNotFoundError):
        vfs.lookup(top.inode, "missing")
    f = walk(vfs, "ds/dir/file")
    with pytest.raises(NotADirectoryError):
        vfs.lookup(f.inode, "x")          # lookup below a file
    with pytest.raises(NotADirectoryError):
        vfs.readdir(f.inode)
    with pytest.raises(FileNotFoundError):
        vfs.node(999_999)                 # unknown inode
    assert vfs.lookup(top.inode, ".") is top
    # '..' is the kernel's business; the model must not invent an entry for it.
    with pytest.raises(FileNotFoundError):
        vfs.lookup(top.inode, "..")


def test_name_at_revision_lookup(vfs):
    s1 = snap(entry("a.txt", 1), revision="abc123")
    s2 = snap(entry("a.txt", 2), entry("b.txt"), revision="def456")
    vfs.set_dataset("ds", s1)
    vfs.set_dataset("ds", s2)
    current = vfs.lookup(ROOT_INODE, "ds")
    assert current.snapshot is s2
    pinned = vfs.lookup(ROOT_INODE, "ds@abc123")
    assert pinned.snapshot is s1 and pinned is not current
    assert vfs.lookup(pinned.inode, "a.txt").size == 1
    assert vfs.lookup(ROOT_INODE, "ds@def456") is current
    # Pinned revisions are reachable by name but not listed.
    assert [n for n, _ in vfs.readdir(ROOT_INODE)] == ["ds"]
    for bad in ("ds@nope", "other@abc123", "ds@", "@abc123"):
        with pytest.raises(FileNotFoundError):
            vfs.lookup(ROOT_INODE, bad)
    # name@revision only means something at the root.
    with pytest.raises(FileNotFoundError):
        vfs.lookup(current.inode, "ds@abc123")


def test_set_dataset_switches_while_old_nodes_stay_valid(vfs):
    old_snap = snap(entry("model.bin", 10, fo="fo-old"), revision="v1")
    vfs.set_dataset("ds", old_snap)
    old_file = walk(vfs, "ds/model.bin")
    old_inode = old_file.inode
    new_snap = snap(entry("model.bin", 20, fo="fo-new"), revision="v2")
    replaced = vfs.set_dataset("ds", new_snap)
    assert replaced is not None and replaced.snapshot is old_snap
    # A file opened before the switch keeps reading the old snapshot.
    still = vfs.node(old_inode)
    assert still is old_file and still.entry.file_object == "fo-old" and still.size == 10
    assert still.snapshot is old_snap
    # New lookups see the new snapshot, with a different inode.
    new_file = walk(vfs, "ds/model.bin")
    assert new_file.inode != old_inode and new_file.entry.file_object == "fo-new"
    assert vfs.datasets() == {"ds": new_snap}


def test_setting_the_same_snapshot_again_keeps_nodes(vfs):
    s = snap(entry("f"))
    vfs.set_dataset("ds", s)
    f = walk(vfs, "ds/f")
    assert vfs.set_dataset("ds", snap(entry("f"))) is None  # equal snapshot: nothing replaced
    assert walk(vfs, "ds/f") is f


def test_same_revision_with_different_content_is_rebuilt(vfs):
    # A moving revision (a branch name) that now points at other bytes.
    vfs.set_dataset("ds", snap(entry("f", 1, fo="one"), revision="main"))
    vfs.set_dataset("ds", snap(entry("f", 1, fo="two"), revision="main"))
    assert walk(vfs, "ds/f").entry.file_object == "two"
    assert vfs.lookup(vfs.lookup(ROOT_INODE, "ds@main").inode, "f").entry.file_object == "two"


def test_remove_dataset(vfs):
    vfs.set_dataset("ds", snap(entry("f"), revision="r1"))
    f = walk(vfs, "ds/f")
    vfs.ref(f)  # the kernel looked it up (an open file keeps that reference)
    removed = vfs.remove_dataset("ds")
    assert removed is not None
    with pytest.raises(FileNotFoundError):
        vfs.lookup(ROOT_INODE, "ds")
    with pytest.raises(FileNotFoundError):
        vfs.lookup(ROOT_INODE, "ds@r1")
    assert vfs.node(f.inode) is f  # an open handle still resolves
    assert vfs.datasets() == {}
    assert vfs.remove_dataset("ds") is None


@pytest.mark.parametrize(
    "files",
    [
        (entry("a"), entry("a/b")),    # a file, then the same name used as a directory
        (entry("a/b"), entry("a")),    # a directory, then the same name used as a file
        (entry("x/a"), entry("x/a/b/c")),  # the conflict deeper down
    ],
)
def test_file_dir_conflicts_are_rejected(vfs, files):
    # A listing that needs one name to be both a file and a directory.
    with pytest.raises(ValueError):
        vfs.set_dataset("ds", snap(*files))
    assert vfs.datasets() == {}
    with pytest.raises(FileNotFoundError):
        vfs.lookup(ROOT_INODE, "ds")


def test_failed_switch_keeps_the_current_snapshot(vfs):
    good = snap(entry("f"), revision="good")
    vfs.set_dataset("ds", good)
    # A new listing with a conflict must not take the dataset away.
    with pytest.raises(ValueError):
        vfs.set_dataset("ds", snap(entry("f"), entry("f/g"), revision="bad"))
    assert vfs.datasets() == {"ds": good}
    assert walk(vfs, "ds/f").entry.path == "f"
    with pytest.raises(FileNotFoundError):
        vfs.lookup(ROOT_INODE, "ds@bad")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a@b", "/abs"])
def test_invalid_dataset_names(vfs, name):
    # Names that would alias the root, escape it, or clash with name@revision.
    with pytest.raises(ValueError):
        vfs.set_dataset(name, snap(entry("f")))
    assert vfs.readdir(ROOT_INODE) == []


def test_datasets_with_unicode_names(vfs):
    vfs.set_dataset("données", snap(entry("日本語/ファイル.bin")))
    assert walk(vfs, "données/日本語/ファイル.bin").size == 3


def test_root_mtime_changes_on_switch(vfs):
    before = vfs.root.mtime
    vfs.root.mtime = before - 1000
    vfs.set_dataset("ds", snap(entry("f")))
    assert vfs.root.mtime > before - 1000


def test_old_trees_are_freed_once_unreachable_and_forgotten(vfs):
    # Snapshot switches used to keep every tree for the life of the agent:
    # 50 switches of a 100-file dataset left 5,051 nodes.
    files = [entry(f"d{i % 10}/f{i}", fo=f"fo{i}") for i in range(100)]
    per_tree = 1 + 10 + 100  # the dataset's directory, 10 directories, 100 files
    for n in range(50):
        vfs.set_dataset("ds", snap(*files, revision=f"r{n}"))
    assert vfs.node_count == 1 + 2 * per_tree  # the root, the current tree and the previous one
    assert walk(vfs, "ds@r49/d0/f0") is walk(vfs, "ds/d0/f0")
    assert walk(vfs, "ds@r48/d0/f0") is not walk(vfs, "ds/d0/f0")
    with pytest.raises(FileNotFoundError):
        vfs.lookup(ROOT_INODE, "ds@r47")


def test_a_detached_node_the_kernel_holds_lives_until_forgotten(vfs):
    vfs.set_dataset("ds", snap(entry("sub/f", fo="one"), revision="r1"))
    f1 = walk(vfs, "ds/sub/f")
    d1 = walk(vfs, "ds/sub")
    vfs.ref(f1)
    vfs.ref(f1)  # two lookups
    vfs.set_dataset("ds", snap(entry("sub/f", fo="two"), revision="r2"))
    vfs.set_dataset("ds", snap(entry("sub/f", fo="three"), revision="r3"))  # r1 is no longer reachable
    with pytest.raises(FileNotFoundError):
        vfs.lookup(ROOT_INODE, "ds@r1")
    with pytest.raises(FileNotFoundError):
        vfs.node(d1.inode)  # nobody held it: gone at once
    assert vfs.node(f1.inode) is f1  # the kernel still holds it (an open file, a cwd)
    vfs.forget(f1.inode, 1)
    assert vfs.node(f1.inode) is f1
    vfs.forget(f1.inode, 1)
    with pytest.raises(FileNotFoundError):
        vfs.node(f1.inode)
    vfs.forget(f1.inode, 1)  # a late or repeated forget is harmless


def test_forgetting_a_reachable_node_keeps_it(vfs):
    vfs.set_dataset("ds", snap(entry("f"), revision="r1"))
    f = walk(vfs, "ds/f")
    vfs.ref(f)
    vfs.forget(f.inode, 1)
    assert vfs.node(f.inode) is f
    assert walk(vfs, "ds/f") is f


def test_a_moving_revision_frees_the_tree_it_named_before(vfs):
    vfs.set_dataset("ds", snap(entry("f", fo="one"), revision="main"))
    old = walk(vfs, "ds/f")
    vfs.set_dataset("ds", snap(entry("f", fo="two"), revision="main"))
    with pytest.raises(FileNotFoundError):
        vfs.node(old.inode)
    assert vfs.node_count == 1 + 2


def test_switching_back_to_the_previous_revision_reuses_its_tree(vfs):
    vfs.set_dataset("ds", snap(entry("f", fo="one"), revision="r1"))
    f1 = walk(vfs, "ds/f")
    vfs.set_dataset("ds", snap(entry("f", fo="two"), revision="r2"))
    vfs.set_dataset("ds", snap(entry("f", fo="one"), revision="r1"))  # a rollback
    assert walk(vfs, "ds/f") is f1
    assert walk(vfs, "ds@r2/f").entry.file_object == "two"


def test_a_node_found_again_through_a_held_directory_lives_until_forgotten(vfs):
    # A shell whose working directory is in an old tree runs `cat f`: the
    # kernel looks f up in the directory it holds, then asks for f's inode.
    vfs.set_dataset("ds", snap(entry("sub/f", fo="one"), revision="r1"))
    sub = walk(vfs, "ds/sub")
    vfs.ref(sub)
    vfs.set_dataset("ds", snap(entry("sub/f", fo="two"), revision="r2"))
    vfs.set_dataset("ds", snap(entry("sub/f", fo="three"), revision="r3"))
    f = vfs.lookup(sub.inode, "f")
    vfs.ref(f)
    assert vfs.node(f.inode) is f and f.entry.file_object == "one"
    vfs.forget(f.inode, 1)
    with pytest.raises(FileNotFoundError):
        vfs.node(f.inode)


def test_names_that_no_longer_lead_where_they_did_are_reported_once(vfs):
    # The kernel caches root names for a day; the agent invalidates these.
    for n in range(4):
        vfs.set_dataset("ds", snap(entry("f", fo=f"fo{n}"), revision=f"r{n}"))
    assert vfs.take_unnamed() == ["ds@r0", "ds@r1"]  # r3 current, r2 the previous one
    assert vfs.take_unnamed() == []
    vfs.set_dataset("ds", snap(entry("f", fo="moved"), revision="r3"))  # a moving revision re-pointed
    assert vfs.take_unnamed() == ["ds@r3"]
    vfs.remove_dataset("ds")
    assert sorted(vfs.take_unnamed()) == ["ds@r2", "ds@r3"]


def test_a_listing_that_cannot_be_shown_leaves_no_nodes(vfs):
    vfs.set_dataset("ds", snap(entry("f"), revision="good"))
    before = vfs.node_count
    with pytest.raises(ValueError):
        vfs.set_dataset("ds", snap(*[entry(f"d/x{i}") for i in range(50)], entry("d"), revision="bad"))
    assert vfs.node_count == before
