"""The slab sampler and stream: order, shards, remainder, exact mid-epoch resume, batching."""

from __future__ import annotations

import pytest
import torch

from pipeline.data import PreprocessConfig, SlabStream, SlabStreamConfig, preprocess


def _config(*scans, **kw):
    kw.setdefault("num_workers", 0)
    return SlabStreamConfig(scans=tuple(scans), **kw)


def _positions(samples):
    return [s.meta["position"] for s in samples]


def test_order_is_a_pure_function_of_seed_and_epoch(mri_scan, ct_scan):
    a = SlabStream(_config(mri_scan, ct_scan, seed=1))
    b = SlabStream(_config(mri_scan, ct_scan, seed=1))
    assert a.keys() == b.keys()
    first = [(k.scan, k.d0) for k in a.keys()]
    a.set_epoch(1)
    assert [(k.scan, k.d0) for k in a.keys()] != first
    c = SlabStream(_config(mri_scan, ct_scan, seed=2))
    assert [(k.scan, k.d0) for k in c.keys()] != first
    unshuffled = SlabStream(_config(mri_scan, ct_scan, shuffle=False)).keys()
    assert [(k.scan, k.d0) for k in unshuffled][:3] == [(0, 0), (0, 2), (0, 4)]


@pytest.mark.parametrize("remainder", ["pad", "drop", "uneven"])
def test_rank_shards_are_disjoint_and_cover_the_epoch(mri_scan, ct_scan, remainder):
    # 5 MRI slabs + 4 CT slabs = 9 samples over 2 ranks.
    shards = [SlabStream(_config(mri_scan, ct_scan, remainder=remainder), rank=r, world_size=2)
              for r in range(2)]
    keys = [s.keys() for s in shards]
    pos = [[k.position for k in ks] for ks in keys]
    assert not set(pos[0]) & set(pos[1])
    slabs = [{(k.scan, k.d0) for k in ks} for ks in keys]
    union = slabs[0] | slabs[1]
    if remainder == "drop":
        assert len(keys[0]) == len(keys[1]) == 4 and len(union) == 8
    elif remainder == "pad":
        assert len(keys[0]) == len(keys[1]) == 5 and len(union) == 9
    else:
        assert (len(keys[0]), len(keys[1])) == (5, 4) and len(union) == 9
        assert not slabs[0] & slabs[1]
    assert len(shards[0]) == len(keys[0])


def test_mid_epoch_resume_yields_exactly_the_rest(ct_scan, mri_scan):
    config = _config(mri_scan, ct_scan, num_workers=2, prefetch_factor=2, seed=7)
    full = list(SlabStream(config))
    stream = SlabStream(config)
    seen = []
    for sample in stream:
        seen.append(sample)
        if len(seen) == 4:
            break  # workers have read ahead; the state counts what the loop received
    state = stream.state_dict()
    assert state["position"] == 4 and state["epoch"] == 0
    resumed = SlabStream(config)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert _positions(seen + rest) == _positions(full)
    for a, b in zip(seen + rest, full):
        assert torch.equal(a.y, b.y)
    assert resumed.epoch == 1 and resumed.state_dict()["position"] == 0
    # The interrupted stream itself also continues where its loop stopped.
    assert _positions(list(stream)) == _positions(full)[4:]


def test_resume_at_another_world_size_continues_the_global_order(mri_scan, ct_scan):
    ranks = [SlabStream(_config(mri_scan, ct_scan, remainder="uneven"), rank=r, world_size=2) for r in range(2)]
    done = []
    for stream in ranks:
        it = iter(stream)
        done += [next(it).meta["position"], next(it).meta["position"]]
    single = SlabStream(_config(mri_scan, ct_scan, remainder="uneven"), rank=0, world_size=1)
    single.load_state_dict(ranks[0].state_dict())
    rest = [s.meta["position"] for s in single]
    assert sorted(done + rest) == list(range(9))


def test_state_from_other_settings_is_refused(ct_scan, mri_scan):
    state = SlabStream(_config(ct_scan)).state_dict()
    with pytest.raises(ValueError, match="other scans or settings"):
        SlabStream(_config(mri_scan)).load_state_dict(state)


def test_thicker_slabs_must_align_to_chunks(ct_scan):
    stream = SlabStream(_config(ct_scan, slab_thickness=4, shuffle=False))
    assert [s.meta["d_slice"] for s in stream] == [(0, 4), (4, 8)]
    with pytest.raises(ValueError, match="multiple of the chunk depth"):
        SlabStream(_config(ct_scan, slab_thickness=3))


def test_batches_stack_samples_with_one_operator(ct_scan, mri_scan):
    batch = next(iter(SlabStream(_config(ct_scan, batch_size=2))))
    assert batch.y.shape == (2, 2, 18, batch.y.shape[-1])
    x = torch.zeros(2, 2, 20, 20)
    assert batch.op(x).shape == batch.y.shape  # the slab operator broadcasts over the batch
    assert len(batch.meta) == 2
    with pytest.raises(ValueError, match="different operators"):
        next(iter(SlabStream(_config(mri_scan, batch_size=2))))


def test_image_mode_crops_derived_volumes(tmp_path, copy_scan, ct_scan):
    path = copy_scan(ct_scan)
    preprocess(PreprocessConfig(scan=path, outputs=("n2i",), n2i_splits=3, progress=False,
                                workers=1, scheduler="sync"))
    config = _config(path, mode="image", crop_shape=(2, 8, 6), crops_per_scan=5, seed=4,
                     include_reference=True)
    a, b = list(SlabStream(config)), list(SlabStream(config))
    assert len(a) == 5
    for s, t in zip(a, b):
        assert s.op is None and s.y.shape == (3, 2, 8, 6)
        assert s.meta["crop"] == t.meta["crop"] and torch.equal(s.y, t.y)
        assert s.meta["reference"].shape == (2, 8, 6)
        assert s.meta["crop"][0] % 2 == 0  # aligned to chunks along D
    with pytest.raises(ValueError, match="derived/fbp"):
        SlabStream(_config(path, mode="image", crop_shape=(2, 8, 6), image_arrays=("fbp",)))
