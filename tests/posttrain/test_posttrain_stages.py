"""SFT -> KTO chained through run folders with a tiny small LM, DPO, and a merge = the closed-form average."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from metafit.data.pretraining import instruction_chats
from metafit.data.text import load_text_dataset
from metafit.models import LlamaForCausalLM, load, save_folder
from metafit.posttrain import stages
from metafit.posttrain.data import make_pool
from metafit.pretrain.small_lm import TINY, llama_config
from metafit.pretrain.tokenizer import train_chat_tokenizer
from metafit.runs import RunDir
from metafit.train import TrainConfig

STEPS = TrainConfig(steps=2, batch_size=4, lr=1e-2, log_every=1, optimizer="sgd")  # plain SGD: the shortest step to compile
EVAL = stages.EvalArgs(n_eval=1, bucket=120, max_new_tokens=2)  # the tiny tokenizer has 320 tokens: long rows


def untrained_student(folder):
    """The small LM's TINY architecture and real chat tokenizer, randomly initialised.

    The stages need the student's interface (chat template, role tokens, HF folder), not its
    skill, so the pretraining of ``small_lm.build`` (two compilations) is skipped: the tokenizer
    is trained on the TINY corpus' documents and chats (all documents: the held-out split only
    matters for pretraining, and drawing it compiles a permutation per class) and the weights are
    drawn in numpy on an abstract model.
    """
    documents = [text for name in TINY.text_datasets for text in load_text_dataset(name).texts[:TINY.max_documents]]
    chats = instruction_chats(TINY.n_chats, seed=0)
    texts = [*documents, *(m["content"] for chat in chats for m in chat)]
    tokenizer = train_chat_tokenizer(texts, TINY.vocab_size, model_max_length=TINY.max_position_embeddings)
    config = llama_config(TINY, len(tokenizer))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: np.asarray(rng.normal(size=x.shape) * 0.05, x.dtype), abstract)
    return save_folder(nnx.merge(graphdef, params), folder, tokenizer)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("posttrain")
    student = untrained_student(root / "student")
    data = root / "data"
    data.mkdir()
    records = []
    for i, ex in enumerate(make_pool(6, seed=1, duplicate_fraction=0.0)):
        records.append({"category": ex.category, "label": ex.category, "prompt": ex.prompt, "answer": ex.answer,
                        "best": "original", "worst": "student" if i % 2 else None,
                        "scores": {"original": {"response": ex.answer}, "student": {"response": "no"}}})
    (data / stages.RECORDS).write_text(json.dumps(records))
    return root, str(student), str(data)


def _run(root, name, fn, args, **kw):
    with RunDir.open(root / name, name) as run:
        return run, fn(args, run=run, **kw)


def test_sft_then_kto_through_run_folders_then_merge(setup):
    root, student, data = setup
    sft_args = stages.StageArgs(method="sft", data_run=data, student=student, buckets=(128,), eval=EVAL)
    _, sft = _run(root, "sft", stages.train_stage, sft_args, train=STEPS, seed=0)
    assert set(sft) == {"start", "sft"} and sft["sft"]["train_rows"] == 6

    kto_args = dataclasses.replace(sft_args, method="kto", init_run=str(root / "sft"))
    run, kto = _run(root, "sft_kto", stages.train_stage, kto_args, train=STEPS, seed=0)
    assert kto["start"] == {k: v for k, v in sft["sft"].items() if k.endswith(("_em", "_loss"))}  # starts from SFT
    assert kto["kto"]["train_rows"] == 9  # 6 desirable + 3 undesirable
    cache = np.load(run.path / "reference_logp.npz")
    assert cache["logp_"].shape == (9,) and np.isfinite(cache["logp_kl_"]).all()

    merge_args = stages.MergeArgs(runs=(str(root / "sft"), str(root / "sft_kto")), weights=(0.25, 0.75),
                                  data_run=data, student=student, eval=EVAL)
    _run(root, "merge", stages.merge_stage, merge_args, seed=0)
    states = [nnx.state(load(root / name / "model")[0]) for name in ("sft", "sft_kto", "merge")]
    for a, b, merged in zip(*(jax.tree.leaves(s) for s in states)):
        np.testing.assert_allclose(merged, 0.25 * a + 0.75 * b, rtol=1e-5, atol=1e-6)


def test_bad_stage_settings_fail_before_compute(setup, tmp_path):
    root, student, data = setup
    with pytest.raises(FileNotFoundError, match="data stage"):
        stages.check_stage(stages.StageArgs(data_run=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="init_run"):
        stages.check_stage(stages.StageArgs(data_run=data, init_run=str(tmp_path)))
    with pytest.raises(ValueError, match="sum to 1"):
        stages.check_merge(stages.MergeArgs(runs=(str(root / "sft"), str(root / "sft_kto")), weights=(0.5, 0.6)))
