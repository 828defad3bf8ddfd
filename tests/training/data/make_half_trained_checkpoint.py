"""Write a checkpoint of a job stopped halfway, with the saereg that is importable.

    python tests/training/data/make_half_trained_checkpoint.py OUT.ckpt

pre_bias_group.ckpt was written by saereg 8e95ed1, whose Adam groups were one per SAE (plus
the JumpReLU thresholds'), before the encoder biases of relu, jumprelu and gated SAEs had a
group of their own; test_resume_layouts.py resumes it. The job is the one JOB() builds: four
SAEs on a small planted-feature cache, 10 of its 20 steps done.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

STEPS, DONE, BATCH = 20, 10, 256


def job(cache_dir: Path):
    """The cache (written to ``cache_dir``, which must not exist) and the job's config."""
    from saereg.training.config import SAETrainConfig, TrainConfig
    from saereg.training.planted import HOOK, PlantedFeatures, write_planted_cache

    folder = write_planted_cache(PlantedFeatures(n_features=32, d=16, seed=3), cache_dir, 4096,
                                 heldout=0, shard_tokens=4096)
    saes = [SAETrainConfig(hook=HOOK, architecture=a, expansion=2, **kw) for a, kw in
            (("relu", {}), ("jumprelu", {"target_l0": 2}), ("gated", {}), ("topk", {"k": 2}))]
    return TrainConfig(model="planted-features", saes=saes, tokens=STEPS * BATCH,
                       batch_tokens=BATCH, buffer_tokens=1024, from_cache=str(folder),
                       log_every=10**6)


def trainer_and_module(cfg, max_steps: int):
    import lightning as L

    from saereg.training.job import prepare_cache
    from saereg.training.module import ActivationDataModule, SAETrainingModule

    cfg, source, d_ins = prepare_cache(cfg, "cpu")
    module = SAETrainingModule(cfg.to_dict(), d_ins)
    trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, accelerator="cpu", devices=1,
                        logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    return trainer, module, ActivationDataModule(None, cfg, cache=source)


def main() -> None:
    out = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        trainer, module, dm = trainer_and_module(job(Path(tmp) / "cache"), DONE)
        trainer.fit(module, datamodule=dm)
        trainer.save_checkpoint(out)
    print(f"{out}: step {trainer.global_step} of {STEPS}")


if __name__ == "__main__":
    main()
