"""dorothyd/merkle.py against transparency-dev's proof probes and reference
roots, and property tests over random trees. Provenance:
tests/vectors/merkle/SOURCES.md."""

import base64
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dorothy.dorothyd import merkle
from dorothy.dorothyd.merkle import ProofError

VECTORS = Path(__file__).parent / "vectors" / "merkle" / "testdata"

# transparency-dev/merkle testonly/constants.go: LeafInputs() and RootHashes().
LEAF_INPUTS = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
REFERENCE_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def _probes(kind: str) -> list:
    files = sorted((VECTORS / kind).rglob("*.json"))
    return [pytest.param(json.loads(f.read_text()), id=str(f.relative_to(VECTORS))) for f in files]


def _b64(value: str) -> bytes:
    return base64.b64decode(value)


def _b64_list(values: list[str] | None) -> list[bytes]:
    return [_b64(v) for v in values or []]


def test_probe_counts_match_sources():
    # SOURCES.md: 98 of each, 6 of each expected to verify.
    for kind in ("inclusion", "consistency"):
        probes = [p.values[0] for p in _probes(kind)]
        assert len(probes) == 98
        assert sum(not p["wantErr"] for p in probes) == 6


@pytest.mark.parametrize("probe", _probes("inclusion"))
def test_inclusion_probe(probe):
    args = (
        probe["leafIdx"],
        probe["treeSize"],
        _b64(probe["leafHash"]),
        _b64_list(probe["proof"]),
        _b64(probe["root"]),
    )
    if probe["wantErr"]:
        with pytest.raises(ProofError):
            merkle.verify_inclusion(*args)
    else:
        merkle.verify_inclusion(*args)


@pytest.mark.parametrize("probe", _probes("consistency"))
def test_consistency_probe(probe):
    # Size-0 probes are here too: the verifier must refuse them, not loop.
    args = (
        probe["size1"],
        probe["size2"],
        _b64_list(probe["proof"]),
        _b64(probe["root1"]),
        _b64(probe["root2"]),
    )
    if probe["wantErr"]:
        with pytest.raises(ProofError):
            merkle.verify_consistency(*args)
    else:
        merkle.verify_consistency(*args)


def test_reference_roots_for_sizes_0_to_8():
    leaves = [merkle.leaf_hash(bytes.fromhex(data)) for data in LEAF_INPUTS]
    for size, expected in enumerate(REFERENCE_ROOTS):
        assert merkle.root(leaves[:size]).hex() == expected


def test_empty_root_is_sha256_of_nothing():
    assert merkle.root([]) == merkle.EMPTY_ROOT == hashlib.sha256(b"").digest()


def test_generators_refuse_out_of_range():
    leaves = [merkle.leaf_hash(b"x")] * 3
    for index in (-1, 3):
        with pytest.raises(ValueError):
            merkle.inclusion_proof(index, leaves)
    for m in (0, 4):
        with pytest.raises(ValueError):
            merkle.consistency_proof(m, leaves)


@pytest.mark.parametrize(
    "args",
    [
        (True, 2, b"\0" * 32, [b"\0" * 32], b"\0" * 32),  # bool is not a size
        (0, 1 << 64, b"\0" * 32, [], b"\0" * 32),  # beyond uint64
        (0, 2, b"\0" * 31, [b"\0" * 32], b"\0" * 32),  # short leaf hash
        (0, 2, b"\0" * 32, None, b"\0" * 32),  # no proof list
        (0, 2, b"\0" * 32, [b"\0" * 33], b"\0" * 32),  # long proof element
    ],
)
def test_verify_inclusion_refuses_bad_argument_types(args):
    with pytest.raises(ProofError):
        merkle.verify_inclusion(*args)


trees = st.lists(st.binary(max_size=8), min_size=1, max_size=70).map(
    lambda data: [merkle.leaf_hash(d) for d in data]
)


@given(trees)
def test_compact_range_matches_recursive_roots(leaves):
    tree = merkle.CompactRange()
    for size, leaf in enumerate(leaves, start=1):
        tree.append(leaf)
        assert tree.size == size
        assert tree.root() == merkle._subtree_root(leaves, 0, size)


@given(trees)
def test_every_inclusion_proof_verifies(leaves):
    root = merkle.root(leaves)
    for index, leaf in enumerate(leaves):
        merkle.verify_inclusion(index, len(leaves), leaf, merkle.inclusion_proof(index, leaves), root)


@given(trees)
def test_every_consistency_proof_verifies(leaves):
    roots = [merkle.root(leaves[:size]) for size in range(len(leaves) + 1)]
    for size2 in range(1, len(leaves) + 1):
        for size1 in range(1, size2 + 1):
            proof = merkle.consistency_proof(size1, leaves[:size2])
            merkle.verify_consistency(size1, size2, proof, roots[size1], roots[size2])


def _flip(proof: list[bytes], element: int, bit: int) -> list[bytes]:
    flipped = bytearray(proof[element])
    flipped[bit // 8] ^= 1 << (bit % 8)
    return proof[:element] + [bytes(flipped)] + proof[element + 1 :]


@settings(max_examples=300)
@given(trees, st.data())
def test_flipped_bit_in_inclusion_proof_is_rejected(leaves, data):
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = merkle.inclusion_proof(index, leaves)
    if not proof:  # a single-leaf tree has nothing to flip
        return
    element = data.draw(st.integers(0, len(proof) - 1))
    bit = data.draw(st.integers(0, 255))
    with pytest.raises(ProofError):
        merkle.verify_inclusion(index, len(leaves), leaves[index], _flip(proof, element, bit), merkle.root(leaves))


@settings(max_examples=300)
@given(trees, st.data())
def test_flipped_bit_in_consistency_proof_is_rejected(leaves, data):
    size2 = len(leaves)
    size1 = data.draw(st.integers(1, size2))
    proof = merkle.consistency_proof(size1, leaves)
    if not proof:  # equal sizes: nothing to flip
        return
    element = data.draw(st.integers(0, len(proof) - 1))
    bit = data.draw(st.integers(0, 255))
    root1, root2 = merkle.root(leaves[:size1]), merkle.root(leaves)
    with pytest.raises(ProofError):
        merkle.verify_consistency(size1, size2, _flip(proof, element, bit), root1, root2)


@given(trees, st.data())
def test_proof_with_extra_or_missing_element_is_rejected(leaves, data):
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof, root = merkle.inclusion_proof(index, leaves), merkle.root(leaves)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(index, len(leaves), leaves[index], proof + [leaves[0]], root)
    if proof:
        with pytest.raises(ProofError):
            merkle.verify_inclusion(index, len(leaves), leaves[index], proof[:-1], root)
