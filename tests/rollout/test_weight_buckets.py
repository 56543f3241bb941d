import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from reasonrl.rollout.weight_buckets import (
    TensorMeta,
    bucket_nbytes,
    pack_bucket,
    plan_buckets,
    stream_buckets,
    tensor_meta,
    unpack_bucket,
)


def test_meta_sizes_by_hand():
    assert TensorMeta("w", "float32", (3, 4)).nbytes == 48
    assert TensorMeta("b", "bfloat16", (5,)).nbytes == 10
    assert TensorMeta("s", "float32", ()).nbytes == 4
    assert tensor_meta("x", torch.zeros(2, 3, dtype=torch.float16)) == TensorMeta("x", "float16", (2, 3))


def test_plan_keeps_order_and_respects_the_limit():
    metas = [TensorMeta(n, "float32", (s,)) for n, s in [("a", 4), ("b", 4), ("c", 10), ("d", 1), ("e", 3)]]
    # sizes 16, 16, 40, 4, 12 bytes, padded to 16-byte boundaries: 16, 16, 48, 16, 16; with a 32-byte limit:
    # [a b] [c] (alone: larger than the limit) [d e]
    buckets = plan_buckets(metas, bucket_bytes=32)
    assert [[m.name for m in b] for b in buckets] == [["a", "b"], ["c"], ["d", "e"]]
    assert [m for b in buckets for m in b] == metas
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(metas, bucket_bytes=0)


def test_pack_unpack_round_trip_mixed_dtypes():
    torch.manual_seed(0)
    tensors = {"w": torch.randn(3, 5), "h": torch.randn(7).to(torch.bfloat16), "i": torch.arange(6).view(2, 3),
               "t": torch.randn(4, 6).t()}  # non-contiguous
    metas = [tensor_meta(n, t) for n, t in tensors.items()]
    buffer = pack_bucket(list(tensors.values()))
    # 60 + 14 + 48 + 96 bytes, each padded to a multiple of 16
    assert buffer.dtype == torch.uint8 and buffer.numel() == 64 + 16 + 48 + 96 == bucket_nbytes(metas)
    for name, tensor in unpack_bucket(buffer, metas):
        assert tensor.dtype == tensors[name].dtype
        assert torch.equal(tensor, tensors[name])


def test_unpack_rejects_a_buffer_of_the_wrong_size():
    with pytest.raises(ValueError, match="holds 3 bytes"):
        unpack_bucket(torch.zeros(3, dtype=torch.uint8), [TensorMeta("w", "float32", (1,))])


def test_tensors_start_at_aligned_offsets():
    metas = [TensorMeta("a", "uint8", (3,)), TensorMeta("b", "int64", (2,))]
    buffer = pack_bucket([torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([7, 8])])
    assert buffer[3:16].eq(0).all()  # padding after the 3 bytes of a
    (_, a), (_, b) = unpack_bucket(buffer, metas)
    assert a.tolist() == [1, 2, 3] and b.tolist() == [7, 8] and b.data_ptr() % 8 == 0


def fresh_copies(named_tensors, alive_when_made: list):
    """``(name, a new copy)`` per pair, as a ZeRO-3 gather or a LoRA merge hands them out; ``alive_when_made`` gets,
    per copy, how many earlier copies' memory is still referenced anywhere (by any tensor or view of it)."""
    storages = []
    for name, tensor in named_tensors:
        alive_when_made.append(sum(not ref.expired() for ref in storages))
        copy = tensor.detach().clone()
        storages.append(StorageWeakRef(copy.untyped_storage()))
        yield name, copy
        del copy


def test_stream_holds_one_bucket_and_no_earlier_tensor():
    """The push's memory: each bucket within the limit, one buffer for all of them, and no tensor held once its
    bytes are in the bucket; the buckets are the ones the server plans from the same metadata."""
    sizes = [10, 30, 5, 25, 25, 7, 40, 1]  # float32: 40..160 bytes, padded to 16
    tensors = [(f"w{i}", torch.full((n,), float(i))) for i, n in enumerate(sizes)]
    alive_when_made, buckets = [], []
    for metas, buffer in stream_buckets(fresh_copies(tensors, alive_when_made), bucket_bytes=160):
        assert buffer.numel() == bucket_nbytes(metas) <= 160
        buckets.append((metas, buffer.untyped_storage().data_ptr(),
                        [t.clone() for _, t in unpack_bucket(buffer, metas)]))  # used up before the next bucket
    assert alive_when_made == [0] * len(sizes)
    assert len({ptr for _, ptr, _ in buckets}) == 1
    all_metas = [m for metas, _, _ in buckets for m in metas]
    assert [metas for metas, _, _ in buckets] == plan_buckets(all_metas, 160)
    values = [t for _, _, unpacked in buckets for t in unpacked]
    assert all(torch.equal(got, want) for got, (_, want) in zip(values, tensors, strict=True))


def test_stream_casts_and_gives_a_larger_tensor_its_own_bucket():
    tensors = [("a", torch.randn(4)), ("big", torch.randn(3, 50)), ("c", torch.randn(2, 3).t())]  # c non-contiguous
    names = []
    for (metas, buffer), (_, tensor) in zip(stream_buckets(iter(tensors), bucket_bytes=64, dtype=torch.bfloat16),
                                            tensors, strict=True):
        ((name, got),) = unpack_bucket(buffer, metas)  # checked before the next bucket reuses the buffer
        names.append(name)
        assert got.dtype == torch.bfloat16 and torch.equal(got, tensor.to(torch.bfloat16))
    assert names == ["a", "big", "c"]
