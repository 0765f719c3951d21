"""Streaming data: stream mixing by proportion and exact mid-epoch resumption of the loader state."""

from __future__ import annotations

import gc

import pytest
from train_data import write_mds

from ddsc.config import ConfigError
from ddsc.data.config import DataConfig, StreamConfig
from ddsc.data.streaming import build_dataloader, check_streams


def _ids(batch):
    return {"cell_id": [s["cell_id"] for s in batch]}


def _data(tmp_path, proportions=(None, None), **kw) -> DataConfig:
    streams = {}
    for name, prop in zip(("a", "b"), proportions, strict=True):
        root = tmp_path / name
        if not root.exists():
            write_mds(root, n_train=40, n_valid=4, name=name)
        streams[name] = StreamConfig(remote=str(root), proportion=prop)
    return DataConfig(streams=streams, num_workers=0, num_canonical_nodes=1, **kw)


def _epoch(loader, skip_batches=0):
    ids = []
    for i, batch in enumerate(loader):
        if i >= skip_batches:
            ids.extend(batch["cell_id"])
    return ids


@pytest.fixture(autouse=True)
def _release_shared_memory():
    """Each test's datasets release their shared memory when collected. (Not Streaming's
    ``clean_stale_shared_memory``: it unlinks the shared memory of every Streaming process on the machine,
    so it would break any training running beside the suite.)"""
    yield
    gc.collect()


def test_mid_epoch_resume_continues_exactly(tmp_path):
    data = _data(tmp_path)
    full = _epoch(build_dataloader(data, "train", 8, _ids, train=True))
    gc.collect()
    assert len(full) == 80 and len(set(full)) == 80

    first = build_dataloader(data, "train", 8, _ids, train=True)
    seen = []
    for i, batch in enumerate(first):
        seen.extend(batch["cell_id"])
        if i == 2:
            break
    state = first.state_dict()
    del first
    gc.collect()
    resumed = build_dataloader(data, "train", 8, _ids, train=True)
    resumed.load_state_dict(state)
    rest = _epoch(resumed)
    assert seen + rest == full  # same order, nothing repeated or skipped


def test_proportions_mix_streams(tmp_path):
    data = _data(tmp_path, proportions=(3.0, 1.0))
    ids = _epoch(build_dataloader(data, "train", 8, _ids, train=True))
    from_a = sum(i.startswith("a-") for i in ids)
    assert len(ids) == 80 and from_a == 60  # 3:1 of an 80-sample epoch


def test_missing_split_is_a_config_error(tmp_path):
    data = _data(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.streams\.a: no MDS split 'test'"):
        check_streams(data, "test")
