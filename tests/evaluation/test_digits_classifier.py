"""The digits judge: accuracy on held-out digits, conditional accuracy, features for FID, caching."""

from __future__ import annotations

import pytest
import torch

from sit_lightning.callbacks.fid import conditional_accuracy
from sit_lightning.data import DigitsDataModule
from sit_lightning.evaluation.digits_classifier import DigitsFeatures, load_or_train_digits_classifier

#: The judge must recognise real test digits at least this well (measured: 98.3% on the 297 test digits).
MIN_TEST_ACCURACY = 0.96


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    return dm.train_images(), dm.test_images()


@pytest.fixture(scope="module")
def judge(digits, tmp_path_factory):
    train, _ = digits
    return load_or_train_digits_classifier(train.x, train.y, cache_dir=tmp_path_factory.mktemp("judge"))


def test_judge_recognises_held_out_digits(judge, digits):
    _, test = digits
    accuracy = (judge.predict(test.x) == test.y).double().mean().item()
    assert accuracy >= MIN_TEST_ACCURACY


def test_conditional_accuracy_of_real_digits(judge, digits):
    _, test = digits
    # real images with their own labels score the judge's test accuracy, counted independently here
    expected = (judge(test.x).argmax(1) == test.y).double().mean().item()
    assert conditional_accuracy(judge, test.x, test.y, batch_size=50) == pytest.approx(expected)
    # labels that have nothing to do with the images score chance (10 classes)
    shuffled = test.y[torch.randperm(len(test.y), generator=torch.Generator().manual_seed(0))]
    assert 0.03 <= conditional_accuracy(judge, test.x, shuffled) <= 0.2
    # every label shifted to the next class: (almost) never right
    assert conditional_accuracy(judge, test.x, (test.y + 1) % 10) <= 1 - MIN_TEST_ACCURACY


def test_features_are_the_penultimate_layer(judge, digits):
    _, test = digits
    features = DigitsFeatures(judge)
    f = features(test.x)
    assert f.shape == (len(test.x), features.num_features)
    # the logits are a linear map of these features
    torch.testing.assert_close(judge.head(f), judge(test.x))


def test_cache_returns_the_same_weights_without_training(digits, tmp_path):
    train, _ = digits
    first = load_or_train_digits_classifier(train.x, train.y, cache_dir=tmp_path)
    (path,) = tmp_path.glob("digits_classifier-*.pt")
    state = {k: v.clone() for k, v in first.state_dict().items()}
    second = load_or_train_digits_classifier(train.x, train.y, cache_dir=tmp_path)
    for k, v in second.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    # other training data -> another file, never the stale one
    load_or_train_digits_classifier(train.x[:300], train.y[:300], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("digits_classifier-*.pt"))) == 2 and path.exists()
