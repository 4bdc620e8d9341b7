"""TinyFusion's depth search checkpointed and resumed in one process: a run killed mid-way and resumed ends bit for
bit where the uninterrupted run does (logits, EMA, losses, decision); a damaged newest checkpoint falls back to the
older one; a checkpoint of another search is refused."""

from __future__ import annotations

import pytest
import torch

from prunedm.pruning import learn_depth_keep
from tests.pruning.test_depth import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread_module")

STEPS = 4


class Killed(RuntimeError):
    pass


class DiesAt(list):
    """Batches that end the run (as a kill would) when batch `step` is asked for."""

    def __init__(self, batches, step: int):
        super().__init__(batches)
        self.step, self.asked = step, 0

    def __getitem__(self, index):
        if self.asked == self.step:
            raise Killed(f"killed at step {self.step}")
        self.asked += 1
        return super().__getitem__(index)


def _batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(3)]


def _search(data, **kwargs):
    model = tiny_dit()
    result = learn_depth_keep(model, data, group_size=2, keep_per_group=1, steps=STEPS, logits_lr=0.05,
                              ema_decay=0.5, **kwargs)  # fmt: skip
    return model, result


def _assert_same(a, b):
    assert a.keep_indices == b.keep_indices
    for name in ("logits", "decision_logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.losses == b.losses


def test_a_killed_search_resumes_bit_for_bit(tmp_path):
    _, whole = _search(_batches())
    with pytest.raises(Killed):
        _search(DiesAt(_batches(), 3), checkpoint_dir=tmp_path, checkpoint_every=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    model, resumed = _search(_batches(), checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
    _assert_same(resumed, whole)
    assert float((whole.logits - whole.logits[:, :1]).abs().max()) > 1e-3, "the logits did not move"
    assert all(not m._forward_hooks for m in model.modules())
    # Resuming a finished search returns its result without a step.
    _, again = _search(DiesAt(_batches(), 0), checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
    _assert_same(again, whole)


def test_a_damaged_newest_checkpoint_falls_back_and_another_search_is_refused(tmp_path):
    _, whole = _search(_batches())
    with pytest.raises(Killed):
        _search(DiesAt(_batches(), 3), checkpoint_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(ValueError, match="saved with lora_rank=8, this search has 4"):
        _search(_batches(), checkpoint_dir=tmp_path, resume=True, lora_rank=4)
    newest = tmp_path / "step-00000003" / "search.safetensors"
    newest.write_bytes(newest.read_bytes()[:-8])
    with pytest.warns(UserWarning, match="sha256"):
        _, resumed = _search(_batches(), checkpoint_dir=tmp_path, resume=True)
    _assert_same(resumed, whole)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        _search(_batches(), checkpoint_every=1)
