"""The structural gate learner and TinyFusion's depth search under FSDP2 (parallel: fsdp) on 2 gloo processes (CPU),
in one spawn: the frozen DiT sharded per block, the gates (and TinyFusion's LoRA) whole on every rank with their
gradients averaged. Gates, hard masks and depth decisions equal one process's on the joined batch (masks and
decisions bit for bit, logits to float rounding; TinyFusion with its default loss and DiT's label dropout on); a
gate run stopped mid-way resumes in one process; TinyFusion's checkpoints resume 1 -> 2 and 2 -> 1 ranks; the CLI's
`prune method=depth depth.learn=tinyfusion` handler on 2 ranks (parallel fsdp and ddp) equals one process's run."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from prunedm.pruning.tinyfusion_loss import keyed_draws, label_embedders
from tests.parallel.gloo_ranks import spawn_ranks
from tests.pruning.test_depth import tiny_dit
from tests.pruning.test_tinyfusion_resume import DiesAt, Killed
from tests.structural.test_structural_distributed import _batch as _gate_batch
from tests.structural.test_structural_distributed import _learner as _gate_learner
from tests.structural.test_structural_distributed import _model as _dit

diffusers = pytest.importorskip("diffusers")

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"),
    pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous"),
    pytest.mark.slow,  # one 2-rank spawn (gates, depth search, depth CLI), FSDP on gloo: ~25 s on 2 loaded cores
]

WORLD = 2
STEPS = 4
DEPTH_BATCH = 2  # TinyFusion: every rank's batches of one size


def _gate_state(learner, prefix: str = "") -> dict[str, torch.Tensor]:
    state = {f"{prefix}logits.{k}": v.detach().clone() for k, v in learner.logits.items()}
    state.update({f"{prefix}mask.{k}": v.to(torch.uint8) for k, v in learner.masks().items()})
    return state


def _depth_batches(rank: int | None):
    """Two batches of (latents, class labels), DEPTH_BATCH per rank (rank None: the ranks' rows joined)."""
    batches = []
    for index in range(2):
        g = torch.Generator().manual_seed(77 + index)
        total = DEPTH_BATCH * WORLD
        latents, labels = torch.randn(total, 4, 8, 8, generator=g), torch.randint(0, 10, (total,), generator=g)
        rows = slice(None) if rank is None else slice(rank * DEPTH_BATCH, (rank + 1) * DEPTH_BATCH)
        batches.append((latents[rows], labels[rows]))
    return batches


def _depth_model():
    model = tiny_dit(4)
    for embedder in label_embedders(model):  # DiT's label dropout, on (0.1 by default; 0.5: some rows drop here)
        embedder.dropout_prob = 0.5
    return model


def _depth_search(rank: int | None, data=None, **kwargs):
    from prunedm.pruning import learn_depth_keep

    # The default loss (noise, timesteps and label dropout keyed by global row) and the official preset (one
    # pattern per image, LoRA on every Linear, AdamW, clipping, EMA), faster logits.
    data = _depth_batches(rank) if data is None else data
    return learn_depth_keep(_depth_model(), data, group_size=2, keep_per_group=1, steps=STEPS, logits_lr=0.05,
                            ema_decay=0.5, shard=rank is not None, **kwargs)  # fmt: skip


def _two_ranks(rank: int, out: str) -> dict[str, torch.Tensor]:
    learner = _gate_learner(_dit(), gradient_checkpointing=True)  # FSDP through checkpointed forwards too
    learner.shard()
    results = {}
    for step in range(STEPS):
        if step == STEPS // 2 and rank == 0:  # the gates are whole on every rank: rank 0 writes them
            learner.save(f"{out}/gates.safetensors")
            results.update(_gate_state(learner, "half."))
        learner.step(_gate_batch(rank, step))
    results.update(_gate_state(learner))
    with pytest.raises(ValueError, match="apply\\(\\) needs the whole model"):
        learner.apply()
    depth = _depth_search(rank, checkpoint_dir=f"{out}/depth-two-ranks", checkpoint_every=STEPS // 2)
    results.update(_depth_state(depth, "depth."))
    # One process's search, killed after step STEPS // 2, resumed here on two ranks.
    results.update(_depth_state(_depth_search(rank, checkpoint_dir=f"{out}/depth-one", resume=True), "depth12."))
    # The CLI's handler (prune method=depth depth.learn=tinyfusion parallel=fsdp) on the digits DiT.
    from prunedm.cli.depth import run_prune_depth
    from prunedm.cli.models import load_model

    for parallel in ("fsdp", "ddp"):
        config = _depth_cli_config(parallel)
        run_prune_depth(
            config, Path(out) / f"depth-cli-{parallel}", False, load_model(config["model"]), torch.device("cpu")
        )
    return results


def _depth_cli_config(parallel: str = "fsdp") -> dict:
    from prunedm.cli.models import ASSETS
    from prunedm.cli.schema import DEFAULTS, validate_config

    config = {**copy.deepcopy(DEFAULTS["prune"]), "model": str(ASSETS / "digits-dit"), "method": "depth",
              "device": "cpu", "parallel": parallel}  # fmt: skip
    config["depth"].update(learn="tinyfusion", steps=3, batch_size=4, logits_lr=0.05, checkpoint_every=2)
    return validate_config("prune", config)


def _depth_state(result, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}keep": torch.tensor(result.keep_indices), f"{prefix}logits": result.logits,
            f"{prefix}decision": result.decision_logits, f"{prefix}losses": torch.tensor(result.losses)}  # fmt: skip


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-structural")
    with pytest.raises(Killed):  # one process's depth search, killed after its checkpoint at step STEPS // 2
        _depth_search(None, DiesAt(_depth_batches(None), STEPS // 2), checkpoint_dir=out / "depth-one",
                      checkpoint_every=STEPS // 2)  # fmt: skip
    for parallel in ("fsdp", "ddp"):
        (out / f"depth-cli-{parallel}").mkdir()  # what the CLI's prepare_out_dir makes
    spawn_ranks(WORLD, out, _two_ranks, "rank{rank}.safetensors")
    return out, [load_file(out / f"rank{rank}.safetensors") for rank in range(WORLD)]


def _joined_gate_batch(step: int):
    parts = [_gate_batch(rank, step) for rank in range(WORLD)]
    return tuple(torch.cat(items) for items in zip(*parts))


def _assert_gates_match(actual: dict, expected: dict):
    closed = total = 0
    for key, value in expected.items():
        if key.startswith("mask."):
            assert torch.equal(actual[key], value), key
            closed, total = closed + int((value == 0).sum()), total + value.numel()
        else:
            torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert 0 < closed < total, (closed, total)  # some gates closed, some open: the comparison bites


def test_sharded_gates_equal_one_process_on_the_joined_batch_and_resume(sharded):
    out, ranks = sharded
    assert all(torch.equal(ranks[0][k], v) for k, v in ranks[1].items())  # every rank holds the same gates
    single = _gate_learner(_dit())
    for step in range(STEPS):
        single.step(_joined_gate_batch(step))
    _assert_gates_match({k: v for k, v in ranks[0].items() if not k.startswith(("half.", "depth."))},
                        _gate_state(single))  # fmt: skip
    # The 2-rank run's mid-way file resumes in one process and ends where one process does.
    resumed = _gate_learner(_dit())
    resumed.load(out / "gates.safetensors")
    assert resumed.step_count == STEPS // 2
    assert all(torch.equal(v, ranks[0][f"half.logits.{k}"]) for k, v in resumed.logits.items())
    for step in range(STEPS // 2, STEPS):
        resumed.step(_joined_gate_batch(step))
    _assert_gates_match(_gate_state(resumed), _gate_state(single))


def _assert_depth_match(ranks: dict, prefix: str, single) -> None:
    """Float rounding of the ranks' reductions only (the mean of two half-batch means, all-reduced gradients)."""
    assert ranks[f"{prefix}keep"].tolist() == single.keep_indices
    torch.testing.assert_close(ranks[f"{prefix}decision"], single.decision_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(ranks[f"{prefix}logits"], single.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(ranks[f"{prefix}losses"], torch.tensor(single.losses), rtol=1e-5, atol=1e-7)


def test_sharded_depth_search_with_the_default_loss_equals_one_process_on_the_joined_batch(sharded):
    _, ranks = sharded
    single = _depth_search(None)
    _assert_depth_match(ranks[0], "depth.", single)
    assert float((single.logits - single.logits[:, :1]).abs().max()) > 1e-3, "the logits did not move"
    # The keyed draws dropped some labels and kept others over the steps: the dropout is exercised.
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    uniforms = torch.cat([keyed_draws(DEPTH_BATCH * WORLD, (4, 8, 8), scheduler, 0, s)[2] for s in range(STEPS)])
    assert 0 < int((uniforms < 0.5).sum()) < len(uniforms)


def test_depth_search_resumes_on_another_number_of_ranks(sharded, tmp_path):
    out, ranks = sharded
    single = _depth_search(None)
    _assert_depth_match(ranks[0], "depth12.", single)  # one process killed mid-way, resumed on two ranks
    # The two-rank run's checkpoint at step STEPS // 2 (its last one removed), resumed in one process.
    shutil.copytree(out / "depth-two-ranks", tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / f"step-{STEPS:08d}")
    resumed = _depth_search(None, checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert resumed.losses[: STEPS // 2] == ranks[0]["depth.losses"][: STEPS // 2].tolist()
    _assert_depth_match(_depth_state(resumed, ""), "", single)


def test_depth_cli_under_fsdp_and_ddp_equals_one_process(sharded, tmp_path):
    from prunedm import load_pretrained
    from prunedm.cli import main

    out, _ = sharded
    config = _depth_cli_config()
    d = config["depth"]
    keys = ("learn", "steps", "batch_size", "logits_lr", "checkpoint_every")
    argv = ["prune", f"model={config['model']}", "method=depth", "device=cpu", "parallel=fsdp",
            *(f"depth.{k}={d[k]}" for k in keys)]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    expected = load_pretrained(tmp_path / "one" / "model").state_dict()
    assert len([k for k in expected if k.endswith("attn1.to_q.weight")]) == 4  # 4 of the 8 blocks kept
    for parallel in ("fsdp", "ddp"):
        two = json.loads((out / f"depth-cli-{parallel}" / "report.json").read_text())
        assert two["kept_blocks"] == one["kept_blocks"] and two["tinyfusion"]["world_size"] == WORLD
        for key in ("logits", "decision_logits", "losses"):
            torch.testing.assert_close(torch.tensor(two["tinyfusion"][key]), torch.tensor(one["tinyfusion"][key]),
                                       rtol=1e-5, atol=1e-6, msg=f"{parallel} {key}")  # fmt: skip
        model = load_pretrained(out / f"depth-cli-{parallel}" / "model").state_dict()
        assert model.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in model.items())


def test_ecodiff_refuses_fsdp():
    from prunedm.structural import EcoDiffLearner

    with pytest.raises(ValueError, match="EcoDiffLearner: parallel 'fsdp' is not supported"):
        EcoDiffLearner(_dit()).shard()
