"""`prunedm prune method=depth depth.learn=tinyfusion` on the shipped digits DiT (8 blocks, class-conditioned, the
digits as data): report.json holds the decision, logits and losses, model/ the pruned DiT; a run killed after a
checkpoint and continued with --resume ends bit for bit where the uninterrupted run does; bad settings refused."""

from __future__ import annotations

import json

import pytest

from prunedm.cli import main
from prunedm.cli.models import ASSETS

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread_module")]

STEPS = 3
ARGS = ["prune", f"model={ASSETS / 'digits-dit'}", "method=depth", "depth.learn=tinyfusion", f"depth.steps={STEPS}",
        "depth.batch_size=4", "depth.checkpoint_every=1", "depth.logits_lr=0.05", "device=cpu"]  # fmt: skip


class Killed(BaseException):
    """Stands for a kill right after a checkpoint."""


def _report(out):
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow  # three CLI runs (whole, killed, resumed) of the digits DiT: ~13 s on 2 loaded cores
def test_learned_depth_pruning_writes_the_decision_and_resumes_bit_for_bit(tmp_path, capsys, monkeypatch):
    from prunedm import load_pretrained
    from prunedm.pruning import tinyfusion

    assert main([*ARGS, "--out", str(tmp_path / "whole")]) == 0
    assert f"depth search (official): step {STEPS}/{STEPS}" in capsys.readouterr().out
    whole = _report(tmp_path / "whole")
    search = whole["tinyfusion"]
    assert whole["blocks_before"] == 8 and len(whole["kept_blocks"]) == 4
    assert all(k in (2 * g, 2 * g + 1) for g, k in enumerate(whole["kept_blocks"]))  # one of each pair
    assert len(search["logits"]) == 4 and len(search["logits"][0]) == 2 and len(search["losses"]) == STEPS
    assert search["logits"] != search["decision_logits"]  # the official preset decides on the EMA
    assert len(load_pretrained(tmp_path / "whole" / "model").transformer_blocks) == 4

    save = tinyfusion.save_search

    def save_then_die(root, step, *args, **kwargs):
        path = save(root, step, *args, **kwargs)
        if step == 2:
            raise Killed
        return path

    monkeypatch.setattr(tinyfusion, "save_search", save_then_die)
    argv = [*ARGS, "--out", str(tmp_path / "killed")]
    with pytest.raises(Killed):
        main(argv)
    assert not (tmp_path / "killed" / "report.json").exists()
    monkeypatch.setattr(tinyfusion, "save_search", save)
    assert main([*argv, "--resume"]) == 0
    resumed = _report(tmp_path / "killed")
    assert resumed == whole


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("depth.keep=[0,2]", "depth.keep and depth.learn=tinyfusion exclude each other"),
        ("depth.group_size=3", "8 blocks do not split into groups of that size"),
        ("depth.keep_per_group=2", "need 1 <= keep_per_group < group_size"),
        ("depth.learn=magic", "depth.learn must be one of tinyfusion"),
    ],
)
def test_bad_depth_search_settings_are_refused(tmp_path, capsys, override, message):
    assert main([*ARGS, override, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
