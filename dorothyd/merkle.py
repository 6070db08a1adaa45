"""RFC 6962 / RFC 9162 Merkle trees over SHA-256: hashing, proofs, verifiers.

Pure functions over hashes; no I/O. The proof generators take the whole list
of leaf hashes (the auditor holds a ledger's leaves in memory) and each runs
in O(n) time. The verifiers follow RFC 9162 sections 2.1.3.2 and 2.1.4.2
step by step and raise `ProofError` on any failure, so a caller cannot
forget to check a boolean.
"""

import hashlib

HASH_SIZE = 32
# Domain separation between leaves and interior nodes (RFC 6962 section 2.1):
# without it a leaf could be passed off as a node and vice versa.
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
# MTH({}) = SHA-256() (RFC 9162 section 2.1.1).
EMPTY_ROOT = hashlib.sha256(b"").digest()
# Tree sizes and indices are uint64 in RFC 9162 and in every other
# implementation; refusing larger ones keeps ours interoperable.
MAX_TREE_SIZE = (1 << 64) - 1


class ProofError(ValueError):
    """An inclusion or consistency proof does not verify."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


class CompactRange:
    """The running root of an append-only tree in O(log n) memory.

    Keeps the roots of the perfect subtrees ("peaks") that make up the tree
    so far, largest first, each with its height. Appending merges equal
    heights like a binary counter; the root folds the peaks right to left,
    which is exactly RFC 6962's split at the largest power of two.
    """

    def __init__(self) -> None:
        self._peaks: list[tuple[int, bytes]] = []
        self.size = 0

    def append(self, leaf: bytes) -> None:
        height, digest = 0, leaf
        while self._peaks and self._peaks[-1][0] == height:
            _, left = self._peaks.pop()
            digest = node_hash(left, digest)
            height += 1
        self._peaks.append((height, digest))
        self.size += 1

    def root(self) -> bytes:
        if not self._peaks:
            return EMPTY_ROOT
        digest = self._peaks[-1][1]
        for _, left in reversed(self._peaks[:-1]):
            digest = node_hash(left, digest)
        return digest


def root(leaf_hashes: list[bytes]) -> bytes:
    """MTH(D[n]) for the given leaf hashes."""
    tree = CompactRange()
    for leaf in leaf_hashes:
        tree.append(leaf)
    return tree.root()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1): RFC 6962's k."""
    return 1 << ((n - 1).bit_length() - 1)


def _subtree_root(leaves: list[bytes], lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) in O(hi - lo) without copying the list."""
    if hi - lo == 1:
        return leaves[lo]
    k = _split(hi - lo)
    return node_hash(_subtree_root(leaves, lo, lo + k), _subtree_root(leaves, lo + k, hi))


def inclusion_proof(index: int, leaf_hashes: list[bytes]) -> list[bytes]:
    """PATH(index, D[n]) (RFC 9162 section 2.1.3.1), lowest sibling first.

    The siblings on the path are disjoint subtrees, so hashing them all
    touches each leaf at most once: O(n).
    """
    n = len(leaf_hashes)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} is outside a tree of size {n}")
    proof: list[bytes] = []
    lo, hi = 0, n
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            proof.append(_subtree_root(leaf_hashes, lo + k, hi))
            hi = lo + k
        else:
            proof.append(_subtree_root(leaf_hashes, lo, lo + k))
            lo = lo + k
    proof.reverse()
    return proof


def consistency_proof(m: int, leaf_hashes: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) (RFC 9162 section 2.1.4.1) for 0 < m <= n.

    A proof from the empty tree is refused, as RFC 9162 and transparency-dev
    do: every tree extends the empty one, so there is nothing to prove.
    """
    n = len(leaf_hashes)
    if not 0 < m <= n:
        raise ValueError(f"no consistency proof from size {m} to size {n}")
    proof: list[bytes] = []
    lo, hi, whole_old_tree = 0, n, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            proof.append(_subtree_root(leaf_hashes, lo + k, hi))
            hi = lo + k
        else:
            proof.append(_subtree_root(leaf_hashes, lo, lo + k))
            lo, m, whole_old_tree = lo + k, m - k, False
    if not whole_old_tree:
        proof.append(_subtree_root(leaf_hashes, lo, hi))
    proof.reverse()
    return proof


def _check_size(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_TREE_SIZE:
        raise ProofError(f"{what} must be an integer in [0, 2^64)")
    return value


def _check_hashes(proof: object, what: str) -> list[bytes]:
    if not isinstance(proof, (list, tuple)):
        raise ProofError(f"{what} must be a list of hashes")
    items = list(proof)
    for item in items:
        if type(item) is not bytes or len(item) != HASH_SIZE:
            raise ProofError(f"every {what} element must be {HASH_SIZE} bytes")
    return items


def verify_inclusion(leaf_index: int, tree_size: int, leaf: bytes, proof: list[bytes], root_hash: bytes) -> None:
    """RFC 9162 section 2.1.3.2: `leaf` is at `leaf_index` in the tree `root_hash`."""
    fn = _check_size(leaf_index, "leaf index")
    sn = _check_size(tree_size, "tree size") - 1
    path = _check_hashes(proof, "inclusion proof")
    if type(leaf) is not bytes or len(leaf) != HASH_SIZE:
        raise ProofError(f"leaf hash must be {HASH_SIZE} bytes")
    if leaf_index >= tree_size:
        raise ProofError(f"leaf index {leaf_index} is not below tree size {tree_size}")
    r = leaf
    for p in path:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # The leaf is on the right border here: skip the levels where it
            # has no left sibling. fn shrinks to 0, so this ends.
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the path to the root")
    if r != root_hash:
        raise ProofError("inclusion proof leads to a different root")


def verify_consistency(size1: int, size2: int, proof: list[bytes], root1: bytes, root2: bytes) -> None:
    """RFC 9162 section 2.1.4.2: the tree `root2` extends the tree `root1`.

    The preconditions RFC 9162 leaves implicit are checked first, as
    transparency-dev/merkle does: equal sizes need an empty proof and equal
    roots, and size1 = 0 is refused. The last one is also what keeps the
    RFC's step 4 finite: with first = 0, fn = -1 never loses its low bit.
    """
    _check_size(size1, "size1")
    _check_size(size2, "size2")
    path = _check_hashes(proof, "consistency proof")
    if size2 < size1:
        raise ProofError(f"size2 {size2} is smaller than size1 {size1}")
    if size1 == 0:
        raise ProofError("a consistency proof from the empty tree is meaningless")
    if size1 == size2:
        if path:
            raise ProofError("equal sizes need an empty proof")
        if root1 != root2:
            raise ProofError("equal sizes but different roots")
        return
    if not path:
        raise ProofError("empty consistency proof")
    if size1 & (size1 - 1) == 0:
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the path to the root")
    if fr != root1:
        raise ProofError("consistency proof does not lead to the first root")
    if sr != root2:
        raise ProofError("consistency proof does not lead to the second root")
