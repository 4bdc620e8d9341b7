"""Train the small models the offline demo and quality benchmark use, and write them to
prunedm/assets/: the digits classifier (FID features) and a DDPM (the tiny UNet) on the digits; with --dit
instead a small class-conditional DiT (bench.quality_dit.DIT_CONFIG) with the same recipe (batch 64, lr 5e-4,
finetune's EMA) for 3000 steps (~0.35 s a step on one idle core), saved in fp16 to stay small
(bench.quality_dit loads it as fp32).

    python scripts/train_digits_models.py [--steps 4000] [--work runs/digits-ddpm]
    python scripts/train_digits_models.py --dit [--steps 3000] [--work runs/digits-dit]

The DDPM trains through `prunedm finetune`, the DiT through prunedm.train.finetune on the labelled digits;
both resume an interrupted run from its checkpoints."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prunedm._atomic import write_text_atomic
from prunedm.cli import main as prunedm_main
from prunedm.data import DigitsDataset
from prunedm.eval import train_classifier
from prunedm.eval.sampling import sample_images, save_grid
from prunedm.serialization import load_pretrained

ASSETS = Path(__file__).resolve().parents[1] / "prunedm" / "assets"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 4000; --dit: 3000)")
    parser.add_argument("--work", default=None, help="the finetune run directory (default runs/digits-ddpm|dit)")
    parser.add_argument("--dit", action="store_true", help="train the digits DiT (prunedm/assets/digits-dit)")
    args = parser.parse_args(argv)
    if args.dit:
        return train_dit(args.steps or 3000, Path(args.work or "runs/digits-dit"))
    args.work, args.steps = args.work or "runs/digits-ddpm", args.steps or 4000

    classifier, test_accuracy = train_classifier(DigitsDataset("train"), DigitsDataset("test"))
    classifier.save(ASSETS / "digits-classifier")
    print(f"classifier test accuracy {test_accuracy:.4f}")

    overrides = [
        "model=arch:tiny-unet", "data=digits", f"finetune.steps={args.steps}", "finetune.batch_size=64",
        "finetune.lr=0.0005", "finetune.checkpoint_every=200", "finetune.log_every=25", "finetune.progress=false",
    ]  # fmt: skip
    resume = ["--resume"] if (Path(args.work) / "config.yaml").exists() else []
    code = prunedm_main(["finetune", *overrides, "--out", args.work, *resume])
    if code:
        return code
    model = load_pretrained(Path(args.work) / "model")
    from diffusers import DDIMScheduler

    samples = sample_images(model, DDIMScheduler(num_train_timesteps=1000), 64, 50, seed=0)
    labels = classifier(samples).argmax(1)
    confidence = torch.softmax(classifier(samples), 1).max(1).values.mean()
    save_grid(samples, ASSETS / "digits-ddpm" / "samples.png", columns=8)
    model.save_pretrained(ASSETS / "digits-ddpm")  # diffusers' format: config.json + safetensors
    info = {
        "steps": args.steps, "classifier_test_accuracy": test_accuracy,
        "sample_classes": torch.bincount(labels, minlength=10).tolist(),
        "sample_mean_confidence": float(confidence),
    }  # fmt: skip
    write_text_atomic(ASSETS / "digits-ddpm" / "training.json", json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0


def train_dit(steps: int, work: Path) -> int:
    """The digits DiT, trained like the DDPM (batch 64, lr 5e-4), timed; writes prunedm/assets/digits-dit with
    its training record: the finetune's logged step times, a 64-sample grid (50 DDIM steps) and the FID of
    1000 samples (25 DDIM steps, labels 0..9 in turn) against all digits, as bench.quality_seeds scores."""
    from diffusers import DDIMScheduler

    from prunedm.bench.quality import Budget, reference_images
    from prunedm.bench.quality_dit import DIT_DIR, build_dit, digits_data
    from prunedm.eval import DigitsClassifier
    from prunedm.eval.fid import evaluate_samples
    from prunedm.train import FinetuneConfig, finetune

    started = time.perf_counter()
    config = FinetuneConfig(steps=steps, batch_size=64, lr=5e-4, checkpoint_every=200, log_every=25, progress=False)
    result = finetune(build_dit(seed=0), digits_data(), work, config, resume=(work / "checkpoints").is_dir())
    seconds = time.perf_counter() - started
    logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_times = [r["step_time_s"] for r in logged if "step_time_s" in r]
    model = result.ema_model.eval().half().float()  # scored as shipped: fp16 weights
    classifier = DigitsClassifier.load(ASSETS / "digits-classifier")
    labels = torch.arange(64) % 10
    samples = sample_images(model, DDIMScheduler(num_train_timesteps=1000), 64, 50, seed=0,
                            conditions={"class_labels": labels})  # fmt: skip
    with torch.no_grad():
        probs = torch.softmax(classifier(samples), 1)
    save_grid(samples, DIT_DIR / "samples.png", columns=8)
    fid_labels = torch.arange(1000) % 10
    fid_samples = sample_images(model, DDIMScheduler(num_train_timesteps=1000), 1000, 25, seed=0,
                                conditions={"class_labels": fid_labels})  # fmt: skip
    scores = evaluate_samples(fid_samples, reference_images(Budget(), 16))
    with torch.no_grad():
        fid_match = (classifier(fid_samples).argmax(1) == fid_labels).float().mean()
    model.half().save_pretrained(DIT_DIR)  # fp16 on disk (1.6 MB); bench.quality_dit loads it as fp32
    info = {
        "steps": steps, "batch_size": 64, "lr": 5e-4, "ema_decay": config.ema_decay, "threads": torch.get_num_threads(),
        "seconds_this_run": seconds, "logged_step_time_s_mean": sum(step_times) / max(1, len(step_times)),
        "final_loss": result.final_loss, "label_match": float((probs.argmax(1) == labels).float().mean()),
        "sample_mean_confidence": float(probs.max(1).values.mean()),
        "fid_1000_ddim25": scores["fid"], "fid_label_match": float(fid_match),
        "fid_classifier_accuracy": scores["classifier_accuracy"], "fid_class_entropy": scores["class_entropy"],
    }  # fmt: skip
    write_text_atomic(DIT_DIR / "training.json", json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
