"""Philox4x32-10 reference (docs/algorithm.md §4): known answers, Triton bit-parity, C++ bit-parity, keys."""

import math
import os

import pytest
import torch

from masked_optim.backends import _cpp_lib
from masked_optim.rng import derive_key, philox4x32, philox_uniform, uint32_to_uniform

# Known-answer vectors of Random123 (kat_vectors, philox4x32_10): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

KEYS = [0, 1, 2**31 - 1, 2**31, 2**32 + 5, 0x123456789ABCDEF, 2**63 - 1]


@pytest.mark.parametrize("counter,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
    words = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def test_uint32_to_uniform_edges():
    x = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 - 2], dtype=torch.int64)
    u = uint32_to_uniform(x)
    assert u.dtype == torch.float32
    assert u[0] == 0 and u[4] == 0  # 0 and ~(-1) = 0
    assert u[2] == u[3] and u[2] < 1.0  # 2**31 - 1 and ~(-2**31) = 2**31 - 1
    assert u[1] == u[5] == torch.tensor(4.6566127342e-10, dtype=torch.float32)


def test_unit_layout_four_words_per_counter():
    """Unit j is word j % 4 of the block at counter j // 4."""
    key = 987654321012345
    u = philox_uniform(key, 11)
    counters = torch.arange(3, dtype=torch.int64)
    z = torch.zeros_like(counters)
    words = philox4x32(counters, z, z, z, key & 0xFFFFFFFF, key >> 32)
    for j in range(11):
        assert u[j] == uint32_to_uniform(words[j % 4][j // 4 : j // 4 + 1])[0]
    assert torch.equal(philox_uniform(key, 7), u[:7])  # a prefix does not depend on n
    assert philox_uniform(key, 0).shape == (0,)


def test_uniforms_are_uniform():
    """Mean and lower-quartile fraction of 2**20 uniforms within 5 sigma (CLT), fixed key."""
    n = 2**20
    u = philox_uniform(derive_key(7, 0, 0), n).double()
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    frac = (u < 0.25).double().mean().item()
    assert abs(frac - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)


def test_derive_key_distinct_and_in_range():
    keys = {derive_key(s, t, i) for s in range(4) for t in range(50) for i in range(50)}
    assert len(keys) == 4 * 50 * 50
    assert all(0 <= k < 2**63 for k in keys)
    assert derive_key(3, 4, 5) == derive_key(3, 4, 5)
    assert derive_key(2**64 - 1, 10**12, 10**6) < 2**63


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_derive_key_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        derive_key(0, bad, 0)


@pytest.mark.parametrize("offset", [0, 1, 3, 4, 5, 4 * 2**32 + 2])
def test_offset_draws_the_units_of_the_whole_tensor(offset):
    """A shard starting at global unit ``offset`` draws the whole tensor's uniforms of its units."""
    key = 42
    shard = philox_uniform(key, 9, offset=offset)
    if offset < 2**20:
        assert torch.equal(shard, philox_uniform(key, offset + 9)[offset:])
    # Unit by unit, from the block at counter j // 4 (also past 2**32 blocks).
    for j in range(offset, offset + 9):
        c = torch.tensor([j // 4], dtype=torch.int64)
        z = torch.zeros_like(c)
        words = philox4x32(c & 0xFFFFFFFF, c >> 32, z, z, key, 0)
        assert shard[j - offset] == uint32_to_uniform(words[j % 4])[0]


def test_philox_uniform_rejects_bad_input():
    with pytest.raises(ValueError, match="n must be a non-negative int, got -1"):
        philox_uniform(0, -1)
    with pytest.raises(ValueError, match="offset must be a non-negative int, got -2"):
        philox_uniform(0, 4, offset=-2)
    with pytest.raises(ValueError, match=r"key must be an int in \[0, 2\*\*64\), got -3"):
        philox_uniform(-3, 4)


# ----------------------------------------------------------------------------- Triton parity



def _triton():
    return pytest.importorskip("triton", reason="triton is not installed (pip install triton)")


def _rand4x_kernel():
    _triton()
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, seed, counter_base, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        local = pid * BLOCK + tl.arange(0, BLOCK)
        counters = local.to(tl.int64) + counter_base
        u0, u1, u2, u3 = tl.rand4x(seed, counters)
        base = local * 4
        tl.store(out_ptr + base, u0, mask=base < n)
        tl.store(out_ptr + base + 1, u1, mask=base + 1 < n)
        tl.store(out_ptr + base + 2, u2, mask=base + 2 < n)
        tl.store(out_ptr + base + 3, u3, mask=base + 3 < n)

    return kernel


@pytest.mark.parametrize("key", KEYS, ids=lambda k: f"key{k:#x}")
def test_reference_equals_triton_rand4x(key):
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    kernel = _rand4x_kernel()
    n = 4099
    block = 1024
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    out = torch.empty(n, dtype=torch.float32, device=device)
    kernel[(triton_cdiv(n, 4 * block),)](out, key, 0, n, BLOCK=block)
    expected = philox_uniform(key, n)
    assert torch.equal(out.cpu(), expected), f"{(out.cpu() != expected).sum()} of {n} uniforms differ"


def test_reference_equals_triton_rand4x_high_counters():
    """Counters at and above 2**32 use the second counter word (tensors of > 2**34 units)."""
    kernel = _rand4x_kernel()
    key, base, blocks = 0xDEADBEEF12345, 2**32 - 3, 8
    out = torch.empty(4 * blocks, dtype=torch.float32)
    kernel[(1,)](out, key, base, 4 * blocks, BLOCK=blocks)
    counters = torch.arange(base, base + blocks, dtype=torch.int64)
    z = torch.zeros_like(counters)
    words = philox4x32(counters & 0xFFFFFFFF, counters >> 32, z, z, key & 0xFFFFFFFF, key >> 32)
    expected = uint32_to_uniform(torch.stack(words, 1).reshape(-1))
    assert torch.equal(out, expected)


def triton_cdiv(a, b):
    return (a + b - 1) // b


# ----------------------------------------------------------------------------- C++ parity
def _require_extension():
    if not _cpp_lib.available():
        if os.environ.get("MASKED_OPTIM_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"the C++ extension is required here but unavailable: {_cpp_lib.unavailable_reason()}")
        pytest.skip(f"C++ extension unavailable: {_cpp_lib.unavailable_reason()}")


@pytest.mark.parametrize("n", [0, 1, 3, 4, 4097, 278011])
@pytest.mark.parametrize("key", KEYS[::2], ids=lambda k: f"key{k:#x}")
def test_cpp_philox_equals_reference(n, key):
    _require_extension()
    out = torch.empty(n, dtype=torch.float32)
    torch.ops.masked_optim.philox_uniform_(out, key)
    assert torch.equal(out, philox_uniform(key, n))


def test_cpp_philox_rejects_bad_output():
    _require_extension()
    with pytest.raises(RuntimeError, match="out must be float32"):
        torch.ops.masked_optim.philox_uniform_(torch.empty(4, dtype=torch.float64), 1)
    with pytest.raises(RuntimeError, match="key must be >= 0"):
        torch.ops.masked_optim.philox_uniform_(torch.empty(4), -1)


def test_cpp_build_info_is_recorded():
    _require_extension()
    info = _cpp_lib.build_info()
    assert info["torch"] == torch.__version__.split("+")[0]
    assert "philox_uniform" in info["kernels"]
