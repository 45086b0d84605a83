"""CleaR's per-epoch overhead over plain PEFT, on all-MiniLM-L6-v2 (issue 7; target < 1.5x).

A CleaR epoch after warm-up = training steps with routing + consistency, plus the
per-sample loss pass over the training set (stochastic routing, eval mode) and the GMM fit.
A plain-PEFT epoch = the training steps alone. Both go through ``metafit.train.fit`` via
``metafit.robust.train_noisy`` with evaluation switched off, so the numbers are the cost of
the method, not of measuring it. Compilation is excluded: a training epoch is the trainer's
mean step time after its first chunk (``FitResult.timing["step_seconds"]``) times the steps
of an epoch, and the first loss pass is dropped from the average.

Usage (2-core CPU: ~6 min; set --train-size / --epochs lower for a quick look):
    python benchmarks/clear_overhead.py --family adapter --train-size 128 --epochs 4
    python benchmarks/clear_overhead.py --family lora --out /tmp/clear_overhead_lora.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="adapter", choices=["adapter", "lora", "bitfit", "prefix"])
    parser.add_argument("--dataset", default="bbc_news")
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4, help="CleaR warms up for 1, so epochs-1 have a loss pass")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = parser.parse_args(argv)

    from metafit.data.noise import add_label_noise
    from metafit.data.text import encode_texts, load_text_dataset, split_dataset, stratified_subset
    from metafit.robust import (ClearConfig, EncodedSplit, NoisyTask, make_method, minilm_backbone,
                                text_classifiers, train_noisy)
    from metafit.train import TrainConfig

    backbone = minilm_backbone()
    dataset = load_text_dataset(args.dataset)
    splits = split_dataset(dataset, key=jax.random.key(0))
    train = stratified_subset(splits.train, args.train_size, key=jax.random.key(1))
    enc = encode_texts(backbone.tokenizer, train.texts, args.max_len)
    noisy = add_label_noise("symmetric", jax.random.key(2), train.labels, num_classes=dataset.num_classes, rate=0.4)
    split = EncodedSplit(enc["input_ids"], enc["attention_mask"], noisy.labels)
    empty = EncodedSplit(enc["input_ids"][:0], enc["attention_mask"][:0], train.labels[:0])
    task = NoisyTask(split, noisy, empty, split._replace(labels=train.labels), dataset.num_classes)

    classifiers = text_classifiers(backbone, dataset.num_classes, tuning=args.family)
    config = TrainConfig(batch_size=args.batch_size, lr=5e-4, log_every=10_000)
    common = dict(epochs=args.epochs, key=jax.random.key(3), evaluate_every_epoch=False, track_memorisation=False,
                  eval_batch_size=args.eval_batch_size)
    measured = {}
    for name, method in [("plain", make_method("ce", classifiers(jax.random.key(0)))),
                         ("clear", make_method("clear", classifiers(jax.random.key(0)), ClearConfig(warmup_epochs=1)))]:
        start = time.perf_counter()
        result = train_noisy(method, classifiers, task, config, **common)
        timing = result.timing
        measured[name] = {
            "total_s": time.perf_counter() - start,
            "train_epoch_s": timing["epoch_seconds"],  # after the first chunk, which includes compilation
            "pass_s": float(np.mean(timing["pass_seconds"][1:])) if len(timing["pass_seconds"]) > 1 else 0.0,
            "first_dispatch_s": timing["first_dispatch_seconds"],
        }
    steps = args.train_size // args.batch_size
    tokens = steps * args.batch_size * args.max_len
    report = {
        "family": args.family, "dataset": args.dataset, "train_size": args.train_size, "batch_size": args.batch_size,
        "max_len": args.max_len, "epochs": args.epochs, "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "machine": platform.machine(),
        **{f"{method}_{field}": value for method, row in measured.items() for field, value in row.items()},
        "plain_epoch_s": measured["plain"]["train_epoch_s"],
        "clear_epoch_s": measured["clear"]["train_epoch_s"] + measured["clear"]["pass_s"],
        "plain_tokens_per_s": tokens / measured["plain"]["train_epoch_s"],
    }
    report["overhead"] = report["clear_epoch_s"] / report["plain_epoch_s"]
    report["overhead_train_steps_only"] = measured["clear"]["train_epoch_s"] / measured["plain"]["train_epoch_s"]
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
