"""Hub ids load offline from the local Hugging Face cache; a checkpoint stored as bfloat16 loads exactly."""
import hashlib
import os

import jax.numpy as jnp
import numpy as np
import pytest

import metafit.models as mm

from models_tiny import batch, build, forward, llama_config, save, torch, torch_out


def cache_like_huggingface_hub(folder, hub_root, repo_id, commit, refs=("main",)):
    """Lays ``folder`` out as huggingface_hub does: blobs by hash, snapshot files linking to them, refs."""
    repo = hub_root / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs").mkdir()
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def test_hub_id_resolves_from_the_local_cache_with_refs_and_revisions(tmp_path, monkeypatch):
    reference = build("LlamaForCausalLM", llama_config())
    folder = tmp_path / "plain"
    save(reference, folder)
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache_like_huggingface_hub(folder, tmp_path / "hf" / "hub", "tiny-org/tiny-llama", commit,
                                          refs=("main", "v1.0"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("tiny-org/tiny-llama", "tiny-org/tiny-llama@v1.0", f"tiny-org/tiny-llama@{commit}"):
        assert mm.resolve(name) == snapshot
    model, _ = mm.load("tiny-org/tiny-llama", tokenizer=False)  # files are links into blobs/: allowed there only
    ids, mask = batch()
    np.testing.assert_allclose(forward(model, ids, mask)[mask == 1], torch_out(reference, ids, mask)[mask == 1],
                               atol=1e-4)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins over HF_HOME
    with pytest.raises(FileNotFoundError, match=r"not in the local Hugging Face cache \(.*elsewhere\).*huggingface-cli"):
        mm.resolve("tiny-org/tiny-llama")
    monkeypatch.delenv("HF_HUB_CACHE")
    for bad in ("tiny-org/tiny-llama@v2", "tiny-org/tiny-llama@../../x", "../tiny-llama"):
        with pytest.raises(FileNotFoundError):
            mm.resolve(bad)


def test_checkpoint_stored_as_bfloat16_loads_its_exact_values(tmp_path):
    reference = build("LlamaForCausalLM", llama_config()).to(torch.bfloat16)
    save(reference, tmp_path)
    model, _ = mm.load(tmp_path, tokenizer=False, dtype=jnp.float32)
    # every bf16 value is exactly representable in fp32: the loaded weights are the stored ones
    theirs = reference.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    ours = np.asarray(model.model.layers[0].self_attn.q_proj.kernel[...])
    np.testing.assert_array_equal(ours.T, theirs)
    ids, mask = batch()
    # transformers reading the same file into fp32 (a fresh load: .float() would keep the bf16-rounded RoPE buffer)
    upcast = type(reference).from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert upcast.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    np.testing.assert_allclose(forward(model, ids, mask)[mask == 1], torch_out(upcast, ids, mask)[mask == 1],
                               atol=1e-4)
