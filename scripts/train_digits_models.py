"""Train the small models the offline demo and quality benchmark use, and write them to
prunedm/assets/: the digits classifier (FID features) and a DDPM (the tiny UNet) on the digits.

    python scripts/train_digits_models.py [--steps 4000] [--work runs/digits-ddpm]

The DDPM trains through `prunedm finetune`, so an interrupted run continues with --resume."""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--work", default="runs/digits-ddpm", help="the finetune run directory (checkpoints)")
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    raise SystemExit(main())
