"""Data sources, window sampling and the split discipline (test text only for reports)."""

from __future__ import annotations

import json

import pytest
from conftest import make_text, train_tokenizer

from metricgp.data import C4_FILE, C4_TRAIN_DOCS, DataRef, load_text, parse_data_ref, windows
from metricgp.errors import MetricGPError


@pytest.fixture()
def data_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "wikitext-2-raw").mkdir(parents=True)
    for split, seed in (("valid", 1), ("test", 2)):
        (root / "wikitext-2-raw" / f"wiki.{split}.raw").write_text(make_text(2000, seed))
    (root / "c4").mkdir()
    docs = [{"text": f"document {i} " + make_text(24, i)} for i in range(1000)]
    (root / C4_FILE).write_text("\n".join(json.dumps(d) for d in docs))
    monkeypatch.setenv("METRICGP_DATA", str(root))
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_text(3000, 0))


def test_purposes_pick_their_splits(data_root):
    assert parse_data_ref("wikitext2", "fitness") == DataRef("wikitext2", "validation")
    assert parse_data_ref("wikitext2", "report") == DataRef("wikitext2", "test")
    # no local train split for wikitext2 here: calibration falls back to validation, never test
    assert parse_data_ref("wikitext2", "calibration") == DataRef("wikitext2", "validation")
    assert parse_data_ref("c4", "calibration") == DataRef("c4", "train")


@pytest.mark.parametrize("purpose", ["calibration", "fitness"])
def test_test_split_is_refused_outside_reports(data_root, purpose, tokenizer):
    with pytest.raises(MetricGPError, match="reserved for reports"):
        parse_data_ref("wikitext2:test", purpose)
    with pytest.raises(MetricGPError, match="only reports"):
        windows(DataRef("wikitext2", "test"), tokenizer, purpose, 16, 2)


def test_reports_only_read_test(data_root):
    with pytest.raises(MetricGPError, match="cannot be used for report"):
        parse_data_ref("wikitext2:validation", "report")


def test_c4_calibration_and_evaluation_documents_are_disjoint(data_root):
    train = load_text(DataRef("c4", "train"))
    test = load_text(DataRef("c4", "test"))
    assert len(train) == C4_TRAIN_DOCS and len(test) == 200
    assert train[0].startswith("document 0 ") and test[0].startswith(f"document {C4_TRAIN_DOCS} ")
    assert not set(train) & set(test)


def test_windows_are_deterministic(data_root, tokenizer):
    ref = parse_data_ref("wikitext2", "calibration")
    a = windows(ref, tokenizer, "calibration", 32, 8, seed=0)
    assert a.shape == (8, 32)
    assert (a == windows(ref, tokenizer, "calibration", 32, 8, seed=0)).all()
    assert not (a == windows(ref, tokenizer, "calibration", 32, 8, seed=1)).all()
    valid = windows(parse_data_ref("wikitext2", "fitness"), tokenizer, "fitness", 32, 4)
    more = windows(parse_data_ref("wikitext2", "fitness"), tokenizer, "fitness", 32, 6)
    assert (more[:4] == valid).all()  # every fidelity sees a prefix of the same windows


def test_bad_data_is_a_clear_error(data_root, tmp_path, tokenizer):
    with pytest.raises(MetricGPError, match="neither a known dataset"):
        parse_data_ref(str(tmp_path / "missing.txt"), "calibration")
    with pytest.raises(MetricGPError, match="unknown split"):
        parse_data_ref("wikitext2:dev", "fitness")
    short = tmp_path / "short.txt"
    short.write_text("the cat")
    with pytest.raises(MetricGPError, match="fewer than one window"):
        windows(parse_data_ref(str(short), "report"), tokenizer, "report", 64, 1)


def test_data_dir_is_found_beside_a_parent_of_the_working_directory(tmp_path, monkeypatch):
    from metricgp import data

    monkeypatch.delenv("METRICGP_DATA", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work" / "deep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "deep")
    monkeypatch.setattr(data, "_local_origin", lambda repo: None)
    monkeypatch.setattr(data, "__file__", str(tmp_path / "elsewhere" / "metricgp" / "data.py"))
    assert data.data_dir() == tmp_path / "shared" / "data"
    monkeypatch.setenv("METRICGP_DATA", str(tmp_path / "mine"))
    assert data.data_dir() == tmp_path / "mine"
