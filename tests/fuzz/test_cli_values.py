"""Every job refuses out-of-range, wrongly typed and unknown values of its config keys with one line
naming the key, what it must be and what it got, before any model is loaded or --out is created."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

MODEL = "model=arch:tiny-unet"

# (job, override, words the one error line must hold)
CASES = [
    # prune
    ("prune", "seed=-1", ["seed must be an integer in [0, 4294967295]", "got -1"]),
    ("prune", "seed=1.5", ["seed must be an integer", "got 1.5"]),
    ("prune", "seed=true", ["seed must be an integer", "got True"]),
    ("prune", "seed=4294967296", ["seed must be an integer in [0, 4294967295]"]),
    ("prune", "device=tpu", ["device must be one of auto, cpu, cuda", "'tpu'"]),
    ("prune", "method=width", ["method must be one of channels, depth", "'width'"]),
    ("prune", "channels.importance=hessian", ["channels.importance must be one of", "diff-pruning", "'hessian'"]),
    ("prune", "channels.ratio=0", ["channels.ratio must be a number in (0, 1)", "got 0"]),
    ("prune", "channels.ratio=1", ["channels.ratio must be a number in (0, 1)", "got 1"]),
    ("prune", "channels.ratio=1.5", ["channels.ratio", "got 1.5"]),
    ("prune", "channels.ratio=-0.1", ["channels.ratio", "got -0.1"]),
    ("prune", "channels.ratio=.nan", ["channels.ratio", "got nan"]),
    ("prune", "channels.ratio=.inf", ["channels.ratio", "got inf"]),
    ("prune", "channels.ratio=[0.3]", ["channels.ratio must be a number", "got [0.3]"]),
    ("prune", "channels.ratio=half", ["channels.ratio must be a number", "got 'half'"]),
    ("prune", "channels.ratio=true", ["channels.ratio must be a number", "got True"]),
    ("prune", "channels.rounding=up", ["channels.rounding must be one of diff-pruning, per-group"]),
    ("prune", "channels.data=", ["channels.data must be a non-empty text", "got ''"]),
    ("prune", "depth.keep=[1, 1]", ["depth.keep must be a non-empty list of distinct integers >= 0"]),
    ("prune", "depth.keep=[-1]", ["depth.keep must be", "got [-1]"]),
    ("prune", "depth.keep=[]", ["depth.keep must be", "got []"]),
    ("prune", "depth.keep=3", ["depth.keep must be", "or null", "got 3"]),
    ("prune", "depth.every=0", ["depth.every must be an integer >= 1", "got 0"]),
    # finetune
    ("finetune", "finetune.lr=-1", ["finetune.lr must be a number > 0, got -1"]),
    ("finetune", "finetune.lr=0", ["finetune.lr must be a number > 0, got 0"]),
    ("finetune", "finetune.lr=.nan", ["finetune.lr must be a number > 0, got nan"]),
    ("finetune", "finetune.lr=nan", ["finetune.lr must be a number > 0, got 'nan'"]),
    ("finetune", "finetune.lr=.inf", ["finetune.lr must be a number > 0, got inf"]),
    ("finetune", "finetune.lr=-1e-4", ["finetune.lr must be a number > 0, got -0.0001"]),
    ("finetune", "finetune.lr=[1e-4]", ["finetune.lr must be a number > 0, got [0.0001]"]),
    ("finetune", "finetune.lr=fast", ["finetune.lr must be a number > 0, got 'fast'"]),
    ("finetune", "finetune.steps=0", ["finetune.steps must be an integer in [1, 1000000000], got 0"]),
    ("finetune", "finetune.steps=-5", ["finetune.steps", "got -5"]),
    ("finetune", "finetune.steps=1.5", ["finetune.steps must be an integer", "got 1.5"]),
    ("finetune", "finetune.steps=true", ["finetune.steps must be an integer", "got True"]),
    ("finetune", "finetune.steps=[10]", ["finetune.steps must be an integer", "got [10]"]),
    ("finetune", "finetune.steps=1e10", ["finetune.steps", "got 10000000000.0"]),
    ("finetune", "finetune.batch_size=0", ["finetune.batch_size must be an integer in [1, 65536], got 0"]),
    ("finetune", "finetune.batch_size=1e9", ["finetune.batch_size", "got 1000000000.0"]),
    ("finetune", "finetune.ema_decay=1", ["finetune.ema_decay must be a number in [0, 1), got 1"]),
    ("finetune", "finetune.ema_decay=-0.1", ["finetune.ema_decay", "got -0.1"]),
    ("finetune", "finetune.ema_decay=1.5", ["finetune.ema_decay", "got 1.5"]),
    ("finetune", "finetune.weight_decay=-1", ["finetune.weight_decay must be a number >= 0, got -1"]),
    ("finetune", "finetune.warmup_steps=-1", ["finetune.warmup_steps must be an integer >= 0, got -1"]),
    ("finetune", "finetune.grad_clip=0", ["finetune.grad_clip must be a number > 0 or null, got 0"]),
    ("finetune", "finetune.grad_clip=-1", ["finetune.grad_clip", "got -1"]),
    ("finetune", "finetune.mixed_precision=fp8", ["finetune.mixed_precision must be one of no, fp16, bf16"]),
    ("finetune", "finetune.checkpoint_every=0", ["finetune.checkpoint_every must be an integer >= 1, got 0"]),
    ("finetune", "finetune.keep_checkpoints=-1", ["finetune.keep_checkpoints must be an integer >= 1, got -1"]),
    ("finetune", "finetune.keep_checkpoints=0", ["finetune.keep_checkpoints", "got 0"]),
    ("finetune", "finetune.log_every=0", ["finetune.log_every must be an integer >= 1, got 0"]),
    ("finetune", "finetune.seed=-1", ["finetune.seed must be an integer", "got -1"]),
    ("finetune", "finetune.progress=maybe", ["finetune.progress must be true or false, got 'maybe'"]),
    ("finetune", "finetune.keep_sparsity=2", ["finetune.keep_sparsity must be true or false, got 2"]),
    ("finetune", "finetune.ema_warmup=sometimes", ["finetune.ema_warmup must be true or false"]),
    ("finetune", "data=[1, 2]", ["data must be a non-empty text, got [1, 2]"]),
    ("finetune", "device=gpu", ["device must be one of auto, cpu, cuda, got 'gpu'"]),
    # learn-mask
    ("learn-mask", "method=sgd", ["method must be one of maskllm, maskpro, magnitude, got 'sgd'"]),
    ("learn-mask", "pattern=4:2", ["pattern must be an N:M pattern with 0 < N < M", "got '4:2'"]),
    ("learn-mask", "pattern=2:2", ["pattern must be an N:M pattern", "got '2:2'"]),
    ("learn-mask", "pattern=two", ["pattern must be an N:M pattern", "got 'two'"]),
    ("learn-mask", "pattern=[2, 4]", ["pattern must be an N:M pattern", "got [2, 4]"]),
    ("learn-mask", "steps=0", ["steps must be an integer in [1, 1000000000], got 0"]),
    ("learn-mask", "batch_size=-1", ["batch_size must be an integer in [1, 65536], got -1"]),
    ("learn-mask", "checkpoint_every=0", ["checkpoint_every must be an integer >= 1, got 0"]),
    ("learn-mask", "maskllm.tau=[1]", ["maskllm.tau must be a list of two numbers > 0", "got [1]"]),
    ("learn-mask", "maskllm.tau=[1, -1]", ["maskllm.tau must be a list of two numbers > 0", "got [1, -1]"]),
    ("learn-mask", "maskllm.tau=[4, .nan]", ["maskllm.tau", "got [4, nan]"]),
    ("learn-mask", "maskllm.scale=5", ["maskllm.scale must be a list of two numbers > 0", "got 5"]),
    ("learn-mask", "maskllm.weight_reg=-1", ["maskllm.weight_reg must be a number >= 0 or null, got -1"]),
    ("learn-mask", "maskpro.logit_init=-1", ["maskpro.logit_init must be a number > 0, budget or null, got -1"]),
    ("learn-mask", "maskpro.mask_lr=0", ["maskpro.mask_lr must be a number > 0 or null, got 0"]),
    ("learn-mask", "maskpro.model_lr=-1e-3", ["maskpro.model_lr must be a number >= 0, got -0.001"]),
    # sparsify
    ("sparsify", "dtype=int8", ["dtype must be one of float32, float16, bfloat16, got 'int8'"]),
    ("sparsify", "backend=cusparse", ["backend must be one of auto, dense, torch, prunedm, got 'cusparse'"]),
    ("sparsify", "verify=maybe", ["verify must be true or false, got 'maybe'"]),
    ("sparsify", "masks=[a]", ["masks must be a non-empty text or null, got ['a']"]),
    ("sparsify", "seed=x", ["seed must be an integer", "got 'x'"]),
    # sample
    ("sample", "num_samples=0", ["num_samples must be an integer in [1, 100000], got 0"]),
    ("sample", "num_samples=1e12", ["num_samples must be an integer in [1, 100000]"]),
    ("sample", "steps=0", ["steps must be an integer in [1, 1000], got 0"]),
    ("sample", "steps=1001", ["steps must be an integer in [1, 1000], got 1001"]),
    ("sample", "scheduler=euler", ["scheduler must be one of ddim, ddpm, got 'euler'"]),
    ("sample", "dtype=float64", ["dtype must be one of float32, float16, bfloat16, got 'float64'"]),
    ("sample", "model=[a, b]", ["model must be a non-empty text or null, got ['a', 'b']"]),
    # eval
    ("eval", "num_samples=-3", ["num_samples must be an integer in [1, 100000], got -3"]),
    ("eval", "steps=0", ["steps must be an integer in [1, 1000], got 0"]),
    ("eval", "scheduler=pndm", ["scheduler must be one of ddim, ddpm"]),
    ("eval", "features=clip", ["features must be one of digits-classifier, inception, got 'clip'"]),
    ("eval", "samples=/tmp/x.safetensors", ["eval needs exactly one of model="]),
    ("eval", "features=inception", ["features=inception needs inception_dir"]),
    ("eval", "reference=/nonexistent-prunedm", ["reference=/nonexistent-prunedm: expected 'digits' or a folder"]),
    # demo
    ("demo", "seed=-1", ["seed must be an integer", "got -1"]),
    ("demo", "pack_check=2", ["pack_check must be true or false, got 2"]),
    ("demo", "prune.importance=hessian", ["prune.importance must be one of"]),
    ("demo", "prune.ratio=1", ["prune.ratio must be a number in (0, 1), got 1"]),
    ("demo", "learn_mask.method=x", ["learn_mask.method must be one of maskllm, maskpro, magnitude"]),
    ("demo", "learn_mask.steps=0", ["learn_mask.steps must be an integer", "got 0"]),
    ("demo", "learn_mask.batch_size=0", ["learn_mask.batch_size must be an integer", "got 0"]),
    ("demo", "finetune.lr=-1", ["finetune.lr must be a number > 0, got -1"]),
    ("demo", "finetune.ema_decay=1", ["finetune.ema_decay must be a number in [0, 1), got 1"]),
    ("demo", "finetune.steps=0", ["finetune.steps must be an integer", "got 0"]),
    ("demo", "finetune.batch_size=-4", ["finetune.batch_size must be an integer", "got -4"]),
    ("demo", "sample.num_samples=0", ["sample.num_samples must be an integer in [1, 100000], got 0"]),
    ("demo", "sample.steps=5000", ["sample.steps must be an integer in [1, 1000], got 5000"]),
    ("demo", "sample.scheduler=x", ["sample.scheduler must be one of ddim, ddpm"]),
    ("demo", "eval.features=x", ["eval.features must be one of digits-classifier, inception"]),
    ("demo", "bench.rounds=0", ["bench.rounds must be an integer in [1, 1000], got 0"]),
    ("demo", "bench.repeats=-1", ["bench.repeats must be an integer in [1, 1000], got -1"]),
    ("demo", "bench.batch_size=1e9", ["bench.batch_size must be an integer in [1, 4096]"]),
    ("demo", "model=", ["model must be a non-empty text, got ''"]),
]


@pytest.mark.parametrize("job,override,words", CASES, ids=[f"{job}:{override}" for job, override, _ in CASES])
def test_bad_value_is_one_clear_line_and_nothing_written(rejects, tmp_path, job, override, words):
    out = tmp_path / "out"
    model = [] if job == "demo" else [MODEL]
    line = rejects([job, *model, override, "--out", out], *words, out=out)
    assert line.startswith(f"prunedm {job}: error: ")


# Unknown keys, per job: the nearest valid key is suggested.
UNKNOWN = [
    ("prune", "channels.ratoi=0.5", ["unknown config key 'channels.ratoi'", "did you mean 'ratio'"]),
    ("finetune", "finetune.learning_rate=1e-4", ["unknown config key 'finetune.learning_rate'"]),
    ("finetune", "lr=1e-4", ["unknown config key 'lr'"]),
    ("learn-mask", "maskllm.temp=[4, 1]", ["unknown config key 'maskllm.temp'"]),
    ("sparsify", "backnd=torch", ["unknown config key 'backnd'", "did you mean 'backend'"]),
    ("sample", "num_sample=4", ["unknown config key 'num_sample'", "did you mean 'num_samples'"]),
    ("eval", "feature=inception", ["unknown config key 'feature'", "did you mean 'features'"]),
    ("demo", "bench.round=2", ["unknown config key 'bench.round'", "did you mean 'rounds'"]),
    ("sample", "model.path=x", ["unknown config key 'model.path'", "'model' is a value, not a mapping"]),
    ("prune", "channels=0.5", ["config key 'channels' must be a mapping, got 0.5"]),
]


@pytest.mark.parametrize("job,override,words", UNKNOWN, ids=[f"{job}:{override}" for job, override, _ in UNKNOWN])
def test_unknown_key_is_one_clear_line(rejects, tmp_path, job, override, words):
    out = tmp_path / "out"
    rejects([job, override, "--out", out], *words, out=out)
