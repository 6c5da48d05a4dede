"""The filesystem model: a pure tree of datasets and their snapshots.

Knows nothing about pyfuse3 or the kernel; ``fuse.py`` translates. The root
lists datasets; ``<name>/`` shows the dataset's current snapshot and
``<name>@<revision>/`` the current or the previous one by its revision.
Replacing a dataset's snapshot swaps one dict entry (atomic between awaits).

Nodes live as long as something can reach them: a tree reachable by name, or
the kernel, which may use any inode it was told about (``ref``) until it
forgets it (``forget``). A tree that is no longer reachable by name is
detached: its nodes the kernel does not hold go at once, the others when the
kernel forgets them. Without this every snapshot switch would keep a whole
tree (one node per file) for the life of the agent.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field

from ..model import FileEntry, Snapshot

ROOT_INODE = 1
# Revisions of a dataset reachable as <name>@<revision> besides the current one.
PREVIOUS_REVISIONS = 1


@dataclass(eq=False)
class Node:
    inode: int
    name: str
    is_dir: bool
    dataset: str = ""
    snapshot: Snapshot | None = None
    entry: FileEntry | None = None
    mtime: float = 0.0
    children: dict[str, Node] = field(default_factory=dict)
    detached: bool = False  # its tree is no longer reachable by name: freed once the kernel forgets it

    @property
    def size(self) -> int:
        return self.entry.size if self.entry is not None else 0

    @property
    def mode(self) -> int:
        if self.is_dir:
            return stat.S_IFDIR | 0o555
        return stat.S_IFREG | (self.entry.mode if self.entry else 0o444)


class Vfs:
    def __init__(self) -> None:
        self._next_inode = ROOT_INODE + 1
        self.root = Node(ROOT_INODE, "", True, mtime=time.time())
        self._nodes: dict[int, Node] = {ROOT_INODE: self.root}
        self._current: dict[str, Node] = {}  # dataset -> root node of its current snapshot
        self._by_revision: dict[tuple[str, str], Node] = {}  # current and previous trees, oldest first
        self._kernel_refs: dict[int, int] = {}  # inode -> lookups the kernel has not forgotten
        self._unnamed: list[str] = []  # NAME@REVISION names that no longer lead where they did

    def _new(self, name: str, is_dir: bool, **kw) -> Node:
        node = Node(self._next_inode, name, is_dir, **kw)
        self._next_inode += 1
        self._nodes[node.inode] = node
        return node

    def _build(self, dataset: str, snap: Snapshot) -> Node:
        first = self._next_inode
        try:
            return self._build_tree(dataset, snap)
        except ValueError:
            for inode in range(first, self._next_inode):  # a listing that cannot be shown leaves nothing
                self._nodes.pop(inode, None)
            raise

    def _build_tree(self, dataset: str, snap: Snapshot) -> Node:
        top = self._new(dataset, True, dataset=dataset, snapshot=snap, mtime=snap.created)
        for entry in snap.files:
            *dirs, leaf = entry.path.split("/")
            parent = top
            for d in dirs:
                child = parent.children.get(d)
                if child is None:
                    child = parent.children[d] = self._new(d, True, dataset=dataset, snapshot=snap,
                                                           mtime=snap.created)
                elif not child.is_dir:
                    raise ValueError(f"{entry.path}: {d} is both a file and a directory in {snap.uri}")
                parent = child
            if leaf in parent.children:
                raise ValueError(f"{entry.path}: listed twice in {snap.uri}")
            parent.children[leaf] = self._new(leaf, False, dataset=dataset, snapshot=snap, entry=entry,
                                              mtime=entry.mtime or snap.created)
        return top

    # -- changes -----------------------------------------------------------

    def set_dataset(self, name: str, snap: Snapshot) -> Node | None:
        """Make ``snap`` the current snapshot of ``name``; returns the node it replaced."""
        if "/" in name or "@" in name or name in ("", ".", ".."):
            raise ValueError(f"invalid dataset name {name!r}")
        key = (name, snap.revision)
        top = self._by_revision.get(key)
        if top is None or top.snapshot.id != snap.id:
            built = self._build(name, snap)
            if top is not None:  # a moving revision (a branch) now names other bytes
                self._unname(key)
            top = built
        self._by_revision.pop(key, None)
        self._by_revision[key] = top  # the newest last
        old = self._current.get(name)
        self._current[name] = top
        self.root.children[name] = top
        self.root.mtime = time.time()
        mine = [k for k in self._by_revision if k[0] == name]
        for k in mine[:-1 - PREVIOUS_REVISIONS]:
            self._unname(k)
        return old if old is not top else None

    def remove_dataset(self, name: str) -> Node | None:
        old = self._current.pop(name, None)
        self.root.children.pop(name, None)
        for key in [k for k in self._by_revision if k[0] == name]:
            self._unname(key)
        self.root.mtime = time.time()
        return old

    def take_unnamed(self) -> list[str]:
        """The root names (NAME@REVISION) that changes since the last call took away or re-pointed.

        The kernel caches names for a day: they must be invalidated, or it
        would keep resolving them to the trees they named (and hold those).
        """
        names, self._unnamed = self._unnamed, []
        return names

    def _unname(self, key: tuple[str, str]) -> None:
        """NAME@REVISION no longer leads to its tree: detach the tree, and report the name."""
        self._detach(self._by_revision.pop(key))
        self._unnamed.append(f"{key[0]}@{key[1]}")

    def _detach(self, top: Node) -> None:
        stack = [top]
        while stack:
            node = stack.pop()
            node.detached = True
            if node.inode not in self._kernel_refs:
                del self._nodes[node.inode]
            stack.extend(node.children.values())

    # -- the kernel's references -------------------------------------------

    def ref(self, node: Node) -> None:
        """The kernel was told about ``node`` (a lookup or a directory entry with attributes).

        A detached node may be found again through a directory of its tree
        that the kernel still holds (a shell's working directory): it lives
        again until the kernel forgets it.
        """
        self._kernel_refs[node.inode] = self._kernel_refs.get(node.inode, 0) + 1
        self._nodes.setdefault(node.inode, node)

    def forget(self, inode: int, count: int) -> None:
        """The kernel dropped ``count`` of its references to ``inode``."""
        left = self._kernel_refs.get(inode, 0) - count
        if left > 0:
            self._kernel_refs[inode] = left
            return
        self._kernel_refs.pop(inode, None)
        node = self._nodes.get(inode)
        if node is not None and node.detached:
            del self._nodes[inode]

    # -- queries ------------------------------------------------------------

    def node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise FileNotFoundError(inode) from None

    def lookup(self, parent: int, name: str) -> Node:
        p = self.node(parent)
        if not p.is_dir:
            raise NotADirectoryError(name)
        if name == ".":
            return p
        child = p.children.get(name)
        if child is None and p.inode == ROOT_INODE and "@" in name:
            dataset, _, revision = name.partition("@")
            child = self._by_revision.get((dataset, revision))
        if child is None:
            raise FileNotFoundError(name)
        return child

    def readdir(self, inode: int) -> list[tuple[str, Node]]:
        node = self.node(inode)
        if not node.is_dir:
            raise NotADirectoryError(inode)
        return sorted(node.children.items())

    @property
    def node_count(self) -> int:
        return len(self._nodes)

    def datasets(self) -> dict[str, Snapshot]:
        return {name: node.snapshot for name, node in self._current.items()}
