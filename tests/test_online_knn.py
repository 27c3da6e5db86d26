"""Online kNN during pretraining: logged every N steps, equal to an offline kNN of the same encoder,
and invisible to the training run itself (same parameters with and without it, resume stays exact)."""

import json

import pytest
import torch

from sslkit import checkpoint as ck
from sslkit.config import compose
from sslkit.tasks import run_pretrain
from sslkit.errors import ConfigError
from sslkit.evaluation import OnlineKNN, eval_sources, extract_features, knn_classify
from sslkit.methods import build_method
from tests.test_engine import tiny


def test_online_knn_runs_every_n_steps_and_matches_offline_knn():
    cfg = compose(tiny())
    method = build_method(cfg).train()
    knn = OnlineKNN(cfg.data, int(cfg.method.view.size), every=3, max_train=40, max_val=16)
    assert knn(1, method) == {} and knn(2, method) == {}
    got = knn(3, method)
    assert method.training  # back in train mode
    # offline: the same thinned splits, the same encoder in eval mode
    from sslkit.data import build_eval_loader

    train_src, val_src = eval_sources(cfg.data, 40, 16)
    assert (len(train_src), len(val_src)) == (40, 16)
    method.eval()
    (a, ay), (b, by) = [extract_features(method.features, build_eval_loader(s, cfg.data, 64, num_workers=0),
                                         torch.device("cpu")) for s in (train_src, val_src)]
    ref = knn_classify(a, ay, b, by, num_classes=len(train_src.classes))
    assert got == {"knn_top1": ref["top1"], "knn_top5": ref["top5"]}


def test_eval_sources_thin_evenly_over_classes():
    cfg = compose(tiny("data.num_samples=80", "data.num_classes=4"))
    train_src, _ = eval_sources(cfg.data, max_train=20)
    counts = torch.bincount(torch.as_tensor(train_src.labels()), minlength=4)
    full = torch.bincount(torch.as_tensor(eval_sources(cfg.data)[0].labels()), minlength=4)
    assert counts.sum() == 20 and (counts - full * 20 / 80).abs().max() <= 2


def test_online_knn_is_logged_and_does_not_change_training(tmp_path):
    base = tiny("model.drop_path_rate=0.2", "trainer.log_every=100", "trainer.knn_train_samples=24", "trainer.knn_val_samples=8")
    run_pretrain(compose(base), tmp_path / "off")
    on = base + ["trainer.knn_every=2"]
    run_pretrain(compose(on + ["trainer.stop_after=3"]), tmp_path / "on")
    run_pretrain(compose(on), tmp_path / "on")  # resume=auto from step 3
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    knn_steps = [r["step"] for r in rows if "knn_top1" in r]
    assert knn_steps == [2, 4, 6]
    assert all(0.0 <= r["knn_top1"] <= r["knn_top5"] <= 100.0 for r in rows if "knn_top1" in r)
    a = ck.load(tmp_path / "off" / "checkpoints" / "last.pt")["model"]
    b = ck.load(tmp_path / "on" / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_knn_every_is_a_config_error():
    cfg = compose(tiny())
    with pytest.raises(ConfigError, match="knn_every"):
        OnlineKNN(cfg.data, 64, every=0, max_train=8, max_val=8)


def test_summary_online_knn_and_sslkit_eval_agree_on_the_one_split(tmp_path):
    """The end-of-run summary, online kNN at the last step and sslkit-eval knn on the checkpoint use the one
    evaluation split (evaluation.eval_sources): with caps above the split sizes they report the same top-1."""
    from sslkit.evaluation import eval_knn

    ov = [x for x in tiny("trainer.knn_every=6", "trainer.knn_val_samples=1000") if x != "trainer.summary=false"]
    run_pretrain(compose(ov), tmp_path)  # 6 steps: online kNN at step 6, then the summary
    online = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]["knn_top1"]
    summary = json.loads((tmp_path / "summary.json").read_text())["knn_top1_pretrained"]
    offline = eval_knn(tmp_path / "checkpoints" / "last.pt")["top1"]
    assert online == summary == offline
