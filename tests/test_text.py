"""Text: data sources and the cached tokenizer, transformer models by config, the token-level
divergences pinned to hand-computed values with padding, the top-k teacher cache, and real
pipelines on small text files (a classifier and a causal language model)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from kdpipe.data import FortunesDataModule, LanguageModelDataModule, TextDataModule
from kdpipe.data.base import UNLABELED
from kdpipe.distill.cache import cached_train_loader, compute_logits
from kdpipe.errors import ConfigError
from kdpipe.losses import DistillOutputs, ForwardKL, GeneralizedJSD, ReverseKL, SkewKL, SoftTargetKL, TopK
from kdpipe.losses.token import log_probs, topk_logits
from kdpipe.models import causal_lm, transformer_classifier

from .conftest import run_cli, run_job, stage_runs

WORDS = {0: "cpu kernel compiler byte cache thread socket", 1: "senate vote law election party court",
         2: "atom quantum cell gene orbit physics"}


def topic_texts(n: int = 120, seed: int = 0) -> list[tuple[str, int]]:
    """Short 'documents' of three topics, each a few words of its topic's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % 3
        words = WORDS[label].split()
        picks = torch.randint(0, len(words), (6,), generator=g).tolist()
        out.append((" ".join(words[j] for j in picks), label))
    return out


def write_csv(path, rows) -> None:
    path.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))


# ---------------------------------------------------------------------------------------------
# The token-level divergences: a teacher (0.8, 0.2) and a student (0.5, 0.5) at the first
# position, identical distributions at the second, and a padding position whose outputs differ
# wildly and must not count. Per-token values by hand (natural log):
#   forward KL  = 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5)                              = 0.192745
#   reverse KL  = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2)                              = 0.223144
#   JSD(0.5)    = 0.5 KL(t || m) + 0.5 KL(s || m), m = (0.65, 0.35)              = 0.050672
#   skew KL     = KL(t || 0.1 t + 0.9 s) = KL((0.8, 0.2) || (0.53, 0.47))       = 0.158505
#   skew rev KL = KL(s || 0.1 s + 0.9 t) = KL((0.5, 0.5) || (0.77, 0.23))       = 0.172373
# and each term averages over the two real tokens, so the expected value is half of these.


def padded_pair() -> DistillOutputs:
    t = torch.log(torch.tensor([[[0.8, 0.2], [0.3, 0.7], [0.999, 0.001]]]))
    s = torch.log(torch.tensor([[[0.5, 0.5], [0.3, 0.7], [0.001, 0.999]]]))
    target = torch.tensor([[0, 1, UNLABELED]])
    return DistillOutputs(s, t, target)


@pytest.mark.parametrize(("term", "per_token"), [
    (ForwardKL(), 0.192745), (ReverseKL(), 0.223144), (GeneralizedJSD(beta=0.5), 0.050672),
    (SkewKL(alpha=0.1), 0.158505), (SkewKL(alpha=0.1, reverse=True), 0.172373),
])
def test_each_token_divergence_matches_its_hand_computed_value_with_padding_masked(term, per_token):
    assert float(term(padded_pair())) == pytest.approx(per_token / 2, abs=1e-5)


def test_token_divergences_are_zero_for_equal_distributions_and_check_their_keys():
    out = padded_pair()
    same = DistillOutputs(out.teacher_logits, out.teacher_logits, out.target)
    for term in (ForwardKL(), ReverseKL(), GeneralizedJSD(), SkewKL(), SkewKL(reverse=True)):
        assert float(term(same)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="strictly between 0 and 1.*ForwardKL"):
        GeneralizedJSD(beta=1.0)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        SkewKL(alpha=1.0)


def test_topk_teacher_round_trips_and_renormalises_over_its_tokens(tmp_path):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 10)
    top = topk_logits(logits, 4)
    assert top.values.dtype == torch.float16 and top.indices.dtype == torch.int32
    torch.save({"values": top.values, "indices": top.indices}, tmp_path / "top.pt")
    back = torch.load(tmp_path / "top.pt", weights_only=True)
    assert torch.equal(back["values"], top.values) and torch.equal(back["indices"], top.indices)
    # the k largest, in order, with their token ids
    assert torch.equal(back["indices"].long(), logits.topk(4, -1).indices)
    # renormalised over the k tokens: a proper distribution, the teacher's ratios kept
    student = torch.randn(3, 5, 10)
    log_s, log_t = log_probs(student, TopK(back["values"], back["indices"]))
    assert torch.allclose(log_t.exp().sum(-1), torch.ones(3, 5), atol=1e-3)
    assert torch.allclose(log_s.exp().sum(-1), torch.ones(3, 5), atol=1e-5)
    ratio = (logits.topk(4, -1).values[..., 0] - logits.topk(4, -1).values[..., 1]).exp()
    assert torch.allclose((log_t[..., 0] - log_t[..., 1]).exp(), ratio, rtol=1e-2)
    # with every token kept the top-k form gives the exact divergence, also through SoftTargetKL
    full = topk_logits(logits, 10)
    target = torch.zeros(3, 5, dtype=torch.long)
    exact = ForwardKL()(DistillOutputs(student, logits, target))
    assert float(ForwardKL()(DistillOutputs(student, TopK(full.values, full.indices), target))) == \
        pytest.approx(float(exact), abs=2e-3)
    kd = SoftTargetKL(temperature=1.0)
    flat = TopK(full.values.reshape(15, 10), full.indices.reshape(15, 10))
    rows = DistillOutputs(student.reshape(15, 10), flat, target.reshape(15))
    assert float(kd(rows)) == pytest.approx(float(exact), abs=2e-3)


def test_the_teacher_cache_of_a_language_model_keeps_top_k_and_feeds_it_aligned(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("\n\n".join(t for t, _ in topic_texts(40)))
    dm = LanguageModelDataModule(path=str(tmp_path / "corpus.txt"), max_length=12, vocab_size=300,
                                 batch_size=8)
    dm.setup()
    teacher = causal_lm([12], 300, layers=1, width=16, heads=2).eval()
    cached = compute_logits(teacher, dm.train_set, topk=5)
    assert set(cached) == {"values", "indices"} and cached["values"].shape == (len(dm.train_set), 12, 5)
    x, y, values, indices = next(iter(cached_train_loader(dm, cached)))
    with torch.no_grad():
        direct = teacher(x).topk(5, -1)
    assert torch.allclose(values.float(), direct.values, atol=1e-2)
    assert torch.equal(indices.long(), direct.indices)


# ---------------------------------------------------------------------------------------------
# Data


def test_text_sources_csv_jsonl_folders_and_datasets_give_the_same_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    rows = topic_texts(60)
    write_csv(tmp_path / "d.csv", rows)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    names = ["cpu", "law", "physics"]
    for i, (t, y) in enumerate(rows):
        (tmp_path / "folder" / names[y]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / names[y] / f"{i:03d}.txt").write_text(t)
    from datasets import Dataset

    Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}).save_to_disk(
        str(tmp_path / "hf"))
    sizes = {}
    for source in ("d.csv", "d.jsonl", "folder", "hf"):
        dm = TextDataModule(path=str(tmp_path / source), num_classes=3, max_length=8, vocab_size=300, seed=0)
        dm.setup()
        x, y = dm.train_set.tensors
        assert x.dtype == torch.long and x.shape[1] == 8 and y.max() == 2
        assert (x[:, 0] != 0).all()  # every text has tokens; padding is id 0
        sizes[source] = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert len(set(sizes.values())) == 1, sizes
    # the class folders name the classes
    assert dm.classes is None
    folder = TextDataModule(path=str(tmp_path / "folder"), num_classes=3, max_length=8, vocab_size=300)
    folder.setup()
    assert folder.classes == names


def test_the_tokenizer_is_trained_on_the_training_split_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    write_csv(tmp_path / "d.csv", topic_texts(60))
    first = TextDataModule(path=str(tmp_path / "d.csv"), num_classes=3, max_length=8, vocab_size=300)
    first.setup()
    second = TextDataModule(path=str(tmp_path / "d.csv"), num_classes=3, max_length=8, vocab_size=300)
    second.setup()
    assert first.tokenizer_cached is False and second.tokenizer_cached is True
    assert torch.equal(first.train_set.tensors[0], second.train_set.tensors[0])
    assert first.fingerprint == second.fingerprint
    # a user's tokenizer file is used as it is
    first.tokenizer.save(str(tmp_path / "tok.json"))
    mine = TextDataModule(path=str(tmp_path / "d.csv"), num_classes=3, max_length=8, vocab_size=300,
                          tokenizer=str(tmp_path / "tok.json"))
    mine.setup()
    assert torch.equal(mine.test_set.tensors[0], first.test_set.tensors[0])


def test_unlabeled_texts_join_the_transfer_set_only_and_never_a_held_out_text(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    write_csv(tmp_path / "d.csv", topic_texts(60))
    plain = TextDataModule(path=str(tmp_path / "d.csv"), num_classes=3, max_length=8, vocab_size=300)
    plain.setup()
    parts = plain.make_splits()  # the same seeded split: which texts are held out
    test_text = plain._texts[int(parts["test"][0][0])]
    extra = [t for t, _ in topic_texts(20, seed=1) if t != test_text]
    (tmp_path / "more.txt").write_text("\n\n".join([*extra, f"  {test_text.upper()} "]))
    dm = TextDataModule(path=str(tmp_path / "d.csv"), num_classes=3, max_length=8, vocab_size=300,
                        unlabeled=str(tmp_path / "more.txt"))
    dm.setup()
    n_train = len(plain.train_set)
    y = dm.train_set.tensors[1]
    # the new texts join the training split without labels; the copy of a test text is dropped
    assert len(y) == n_train + len(extra)
    assert (y[n_train:] == UNLABELED).all() and (y[:n_train] != UNLABELED).all()
    # what the teacher and a student from labels see is the labeled split alone
    assert len(dm.labeled_set) == n_train
    assert torch.equal(dm.val_set.tensors[1], plain.val_set.tensors[1])
    assert dm.fingerprint != plain.fingerprint  # a stage keyed on the data sees the change
    # what the tokenizer (and scripts/pretrain_mlm.py --task) learns from: training + unlabeled texts
    train, unlabeled = dm.training_texts(dm.make_splits())
    assert unlabeled == extra and len(train) == n_train and test_text not in train
    with pytest.raises(ConfigError, match="data.unlabeled"):
        TextDataModule(path=str(tmp_path / "d.csv"), num_classes=3, unlabeled=str(tmp_path / "x")).setup()
    with pytest.raises(ConfigError, match="data.unlabeled is for classification"):
        LanguageModelDataModule(path=str(tmp_path / "more.txt"), unlabeled=str(tmp_path / "more.txt"))


def test_bad_text_sources_fail_with_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="data.path is not set"):
        TextDataModule(path=None, num_classes=2).setup()
    with pytest.raises(ConfigError, match="does not exist"):
        TextDataModule(path=str(tmp_path / "nope.csv"), num_classes=2).setup()
    (tmp_path / "d.csv").write_text("body,y\nhello,0\n")
    with pytest.raises(ConfigError, match="data.text_key and data.label_key"):
        TextDataModule(path=str(tmp_path / "d.csv"), num_classes=2).setup()
    write_csv(tmp_path / "e.csv", topic_texts(30))
    with pytest.raises(ConfigError, match="set data.num_classes=3"):
        TextDataModule(path=str(tmp_path / "e.csv"), num_classes=2).setup()
    with pytest.raises(ConfigError, match="augmentations are for images"):
        TextDataModule(path=str(tmp_path / "e.csv"), num_classes=3, augment=["crop"])
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        TextDataModule(path=str(tmp_path / "e.csv"), num_classes=3, tokenizer=str(tmp_path / "tok")).setup()


def test_fortunes_are_read_from_their_files_and_a_missing_package_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "fortunes"
    (root / "de").mkdir(parents=True)
    (root / "computers").write_text("%\n".join(f"The computer {i} crashed again.\n" for i in range(30)))
    (root / "de" / "witze").write_text("%\n".join(f"Der Rechner {i} ist abgestürzt.\n" for i in range(30)))
    (root / "de" / "witze.dat").write_bytes(b"\x00\x01binary index")
    (root / "de" / "witze.u8").write_text("duplicate\n%\n")
    dm = FortunesDataModule(root=str(root), classes={"en": ["computers"], "de": ["de"]}, num_classes=2,
                            max_length=16, vocab_size=300, max_per_class=25)
    dm.setup()
    n = len(dm.train_set) + len(dm.val_set) + len(dm.test_set)
    assert n == 50 and dm.classes == ["de", "en"]
    text = dm.tokenizer.decode(dm.train_set.tensors[0][0].tolist())
    assert "Rechner" in text or "computer" in text
    with pytest.raises(ConfigError, match="apt-get install -y fortunes"):
        FortunesDataModule(root=str(root), classes={"en": ["computers"], "ru": ["ru"]}, num_classes=2).setup()


def test_the_mlm_corpus_is_written_as_a_transfer_set_without_the_topic_tasks_texts(tmp_path, monkeypatch):
    """`pretrain_mlm.py --write-corpus`: the unlabeled fortunes the topic probes use as data.unlabeled,
    with no text of the topic task in it, read back by the topic task as its transfer set."""
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    fake_fortunes(tmp_path / "fortunes")
    (tmp_path / "fortunes" / "people").write_text(  # a topic text copied into another category is dropped
        (tmp_path / "fortunes" / "people").read_text() + "%\n"
        + (tmp_path / "fortunes" / "science").read_text().split("%\n")[0])
    out = tmp_path / "unlabeled.jsonl"
    cmd = ["scripts/pretrain_mlm.py", "--fortunes", str(tmp_path / "fortunes"), "--write-corpus", str(out)]
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    topics = FortunesDataModule(root=str(tmp_path / "fortunes"), num_classes=6, max_length=8, vocab_size=300,
                                classes={c: [c] for c in ("computers", "science", "politics", "work",
                                                          "men-women", "songs-poems")}, unlabeled=str(out))
    labeled = {t.strip() for t in topics.samples()["all"][0]}
    assert texts and not labeled & {t.strip() for t in texts}
    assert {w for t in texts for w in t.split()} <= set("he she they friend neighbour wise fool truth learn "
                                                        "virtue".split())
    topics.setup()
    assert len(topics.train_set) == len(topics.labeled_set) + len(texts)  # all of them join the transfer set


def test_language_model_data_predicts_the_next_token_and_masks_padding(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    docs = ["cpu", *(t for t, _ in topic_texts(19))]
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    dm = LanguageModelDataModule(path=str(tmp_path / "c.txt"), max_length=6, vocab_size=300)
    dm.setup()
    splits = (dm.train_set.tensors, dm.val_set.tensors, dm.test_set.tensors)
    x, y = (torch.cat(t) for t in zip(*splits, strict=True))
    assert x.shape == y.shape == (20, 6)
    for row_x, row_y in zip(x, y, strict=True):
        assert row_x[0] == 1  # <bos>
        shifted = row_x[1:] != 0
        assert torch.equal(row_x[1:][shifted], row_y[:-1][shifted])  # targets are the inputs shifted
        last = int((row_y != UNLABELED).sum()) - 1
        assert row_y[last] == 2 or last == 5  # <eos> ends a document that fits
    short = x[:, -1] == 0
    assert short.any() and (y[short, -1] == UNLABELED).all()


# ---------------------------------------------------------------------------------------------
# Models


def test_transformer_models_are_built_from_config_with_hookable_module_paths():
    clf = transformer_classifier([16], 3, vocab_size=50, layers=2, width=32, heads=4)
    paths = dict(clf.named_modules())
    assert "encoder.layer.1" in paths and "classifier" in paths
    ids = torch.randint(4, 50, (2, 16))
    padded = ids.clone()
    padded[0, 8:] = 0
    clf.eval()
    assert clf(ids).shape == (2, 3)
    # padding is masked: what follows the last real token does not change the output
    other = padded.clone()
    other[0, 8:] = 0
    assert torch.allclose(clf(padded), clf(other))
    lm = causal_lm([16], 50, layers=2, width=32, heads=4).eval()
    assert "transformer.h.1" in dict(lm.named_modules())
    out = lm(ids)
    assert out.shape == (2, 16, 50)
    # causal: a later token does not change an earlier position's prediction
    changed = ids.clone()
    changed[:, 10] = 7
    assert torch.allclose(lm(changed)[:, :10], out[:, :10], atol=1e-5)
    with pytest.raises(ConfigError, match="not a multiple of model.heads"):
        transformer_classifier([16], 3, vocab_size=50, width=30, heads=4)
    with pytest.raises(ConfigError, match="no config.json"):
        causal_lm([16], 50, pretrained="/nonexistent")


def test_a_saved_pretrained_encoder_loads_from_a_local_folder(tmp_path):
    from transformers import BertConfig, BertModel

    encoder = BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=16), add_pooling_layer=False)
    encoder.save_pretrained(tmp_path / "enc")
    clf = transformer_classifier([16], 3, pretrained=str(tmp_path / "enc"))
    assert torch.equal(clf.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)


# ---------------------------------------------------------------------------------------------
# Pipelines

TEXT_FAST = ["trainer.max_epochs=2", "trainer.enable_progress_bar=false", "eval.latency_iters=5",
             "eval.latency_warmup=1", "data.max_length=12", "data.vocab_size=300", "optim.lr=0.003",
             "teacher.model.layers=1", "teacher.model.width=32", "teacher.model.heads=2",
             "student.model.width=16", "student.model.layers=1"]


def test_a_text_classifier_runs_every_stage_and_logs_them(store, tmp_path):
    """Teacher, distill, structured pruning of heads and MLP width, dynamic int8, evaluate."""
    write_csv(tmp_path / "topics.csv", topic_texts(150))
    cmd = ["data=text_files", f"data.path={tmp_path / 'topics.csv'}", "data.num_classes=3",
           "teacher=transformer", "student=transformer_small", "prune=structured", "prune.sparsity=0.5",
           "quantize=dynamic", *(o for o in TEXT_FAST if not o.startswith("data.max_length")),
           "data.max_length=64"]  # at 64 the ONNX exporter's optimiser fails to fold a constant (and warns)
    proc = run_cli(cmd, tmp_path, {"KDPIPE_CACHE_DIR": str(tmp_path / "cache")}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the ONNX exporter's optimiser chatter (a warning per constant it could not fold) stays off the console
    assert "[onnxscript" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    runs = {r.data.tags.get("kdpipe.stage", "pipeline"): r for r in stage_runs()}
    for stage in ("teacher", "distill", "prune", "quantize", "evaluate"):
        assert stage in runs, sorted(runs)
    teacher = runs["teacher"].data.metrics
    assert teacher["test/acc"] > 0.6  # three separable topics: far above chance (1/3)
    assert runs["quantize"].data.metrics["test/acc"] > 0.5
    # structured pruning removed half of every block's attention heads and MLP width, for real
    distill, pruned = runs["distill"].data.metrics, runs["prune"].data.metrics
    assert pruned["model/params"] < distill["model/params"]
    assert pruned["model/flops"] < 0.8 * distill["model/flops"]


def language_model_pipeline(tmp_path, monkeypatch, documents: int, *overrides: str) -> dict:
    """The pipeline (in this process) on a small corpus with a causal LM teacher and student: the
    stage runs by stage."""
    (tmp_path / "corpus.txt").write_text("\n\n".join(t for t, _ in topic_texts(documents)))
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    run_job(["data=text_lm", f"data.path={tmp_path / 'corpus.txt'}", "teacher=causal_lm",
             "student=causal_lm_small", "prune=none", *overrides, *TEXT_FAST], tmp_path / "job", fast=False)
    return {r.data.tags.get("kdpipe.stage"): r for r in stage_runs()}


def test_a_causal_language_model_is_distilled_token_by_token_and_logs_perplexity(store, tmp_path,
                                                                                  monkeypatch):
    runs = language_model_pipeline(tmp_path, monkeypatch, 120, "distill=lm_jsd",
                                   "distill.scheme.cache_topk=8", "quantize=dynamic", "prune=structured",
                                   "prune.sparsity=0.5")
    distill = runs["distill"]
    assert distill.data.tags["kdpipe.teacher_cache"] == "computed"
    assert "train/loss_div" in distill.data.metrics and "val/ppl" in distill.data.metrics
    client = MlflowClient()
    stored = [f.path for f in client.list_artifacts(runs["teacher"].info.run_id, "teacher_outputs")]
    assert stored == ["teacher_outputs/train_logits_top8.pt"]
    ppl = distill.data.metrics["test/ppl"]
    assert 1.0 < ppl < 300  # below a uniform guess over the vocabulary
    assert math.isfinite(runs["quantize"].data.metrics["test/ppl"])
    # structured pruning removed half of every GPT-2 block's MLP width, for real
    assert runs["prune"].data.metrics["model/params"] < distill.data.metrics["model/params"]


def test_structured_pruning_removes_gpt2_heads_and_mlp_units_for_real_and_the_model_reloads():
    """GPT-2's Conv1D layers (weight stored (in, out)) lose MLP units through Torch-Pruning and
    whole attention heads (query, key, value and their output rows): the pruned decoder computes
    exactly what the unpruned one does with the removed units' and heads' output weights zeroed,
    Taylor importance reads next-token gradients, and a fresh model takes the pruned weights."""
    from kdpipe.compress.importance import Taylor
    from kdpipe.compress.structured import StructuredPruner, accumulate_gradients, resize_to_state_dict

    torch.manual_seed(0)
    model = causal_lm([12], 300, vocab_size=300, layers=2, width=32, heads=4, dropout=0.0).eval()
    unpruned = copy.deepcopy(model)
    x = torch.randint(3, 300, (4, 12))
    accumulate_gradients(model, [(x, torch.roll(x, -1, 1))], 1)
    pruner = StructuredPruner(model, x, importance=Taylor())
    pruner.step(0.5)
    assert pruner.sparsity() == pytest.approx(0.5)
    for block, before in zip(model.transformer.h, unpruned.transformer.h, strict=True):
        assert block.mlp.c_fc.weight.shape == (32, 64) and block.mlp.c_proj.weight.shape == (64, 32)
        assert block.attn.c_attn.weight.shape == (32, 48) and block.attn.c_proj.weight.shape == (16, 32)
        assert (block.attn.num_heads, block.attn.split_size) == (2, 16)  # 2 of 4 heads of 8 channels
        for now, rows in ((block.mlp.c_proj.weight, before.mlp.c_proj.weight),
                          (block.attn.c_proj.weight, before.attn.c_proj.weight)):
            kept = [next(i for i in range(len(rows)) if torch.equal(rows[i], r)) for r in now]
            if rows is before.attn.c_proj.weight:  # whole heads: runs of 8 rows
                assert all(kept[i] % 8 == 0 and kept[i:i + 8] == list(range(kept[i], kept[i] + 8))
                           for i in range(0, len(kept), 8))
            with torch.no_grad():
                rows[sorted(set(range(len(rows))) - set(kept))] = 0
    out = model(x)
    torch.testing.assert_close(out, unpruned(x), rtol=0, atol=1e-5)
    fresh = causal_lm([12], 300, vocab_size=300, layers=2, width=32, heads=4, dropout=0.0).eval()
    resize_to_state_dict(fresh, model.state_dict()).load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), out)


def fake_fortunes(root) -> None:
    """Tiny files laid out as Debian's fortunes packages install them (the names
    conf/data/fortunes_*.yaml read), each class with its own words."""
    g = torch.Generator().manual_seed(0)

    def write(path, vocab: str, n: int = 24) -> None:
        words = vocab.split()
        path.parent.mkdir(parents=True, exist_ok=True)
        picks = torch.randint(0, len(words), (n, 5), generator=g).tolist()
        path.write_text("%\n".join(" ".join(words[j] for j in row) + "\n" for row in picks))

    topics = {"computers": "cpu kernel compiler byte cache", "science": "atom quantum cell gene orbit",
              "politics": "senate vote law election party", "work": "boss office meeting salary desk",
              "men-women": "wife husband love date marriage", "songs-poems": "sing rhyme verse melody song"}
    for name, vocab in topics.items():
        write(root / name, vocab)
    write(root / "people", "he she they friend neighbour")
    write(root / "wisdom", "wise fool truth learn virtue")
    write(root / "brasil", "não você obrigado coisa muito")
    for lang, vocab in {"de": "nicht und der ist ich", "es": "pero porque también mucho",
                        "it": "perché anche molto cosa", "cs": "ještě také proto když",
                        "pl": "jest także dlaczego bardzo", "ru": "это тоже почему очень"}.items():
        write(root / lang / "file", vocab)


def test_one_student_learns_two_tasks_from_one_teacher_each_and_logs_both(store, tmp_path, monkeypatch):
    fake_fortunes(tmp_path / "fortunes")
    teacher = [f"teacher.model.teachers.{t}.{k}={v}" for t in ("topics", "language")
               for k, v in (("layers", 1), ("width", 32), ("heads", 2))]
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KDPIPE_FORTUNES_DIR", str(tmp_path / "fortunes"))
    run_job(["data=fortunes_multitask", "data.max_length=10", "data.vocab_size=300",
             "teacher=multitask", "student=multitask_small", "student.model.body.width=16",
             "student.model.body.layers=1", "prune=none", "quantize=dynamic",
             "optim=adamw_transformer", "optim.lr=0.003", "trainer.max_epochs=3",
             "trainer.enable_progress_bar=false",
             "eval.latency_iters=5", "eval.latency_warmup=1", *teacher], tmp_path / "job", fast=False)
    runs = {r.data.tags.get("kdpipe.stage"): r for r in stage_runs()}
    for stage in ("teacher", "distill"):
        m = runs[stage].data.metrics
        for task in ("topics", "language"):
            assert f"val/acc_{task}" in m and f"val/loss_{task}" in m and f"test/acc_{task}" in m, sorted(m)
    teacher_m = runs["teacher"].data.metrics
    assert teacher_m["test/acc_language"] > 0.5 and teacher_m["test/acc_topics"] > 0.4  # chance: 1/8, 1/6


@pytest.mark.parametrize(("build", "student_layer", "teacher_layer"), [
    (transformer_classifier, "encoder.layer.0", "encoder.layer.2"),
    (causal_lm, "transformer.h.0", "transformer.h.2")])
def test_layer_map_terms_match_transformers_of_other_depths_and_widths(build, student_layer, teacher_layer):
    from kdpipe.losses import AttentionRelation, HiddenStateMSE
    from kdpipe.modules.distill import FeatureHooks

    def value(term, student, teacher, x):
        term.setup(student, teacher, x)
        hs = FeatureHooks(student, term.student_layers, "s")
        ht = FeatureHooks(teacher, term.teacher_layers, "t")
        target = torch.zeros(len(x), dtype=torch.long)
        return term(DistillOutputs(student(x), teacher(x), target, hs.pop(), ht.pop()))

    torch.manual_seed(0)
    teacher = build([12], 300, vocab_size=300, layers=3, width=32, heads=4).eval()
    student = build([12], 300, vocab_size=300, layers=1, width=16, heads=2)
    x = torch.randint(4, 300, (4, 12))
    for kind, extra in ((HiddenStateMSE, {}), (AttentionRelation, {"relation_heads": 4})):
        term = kind({student_layer: teacher_layer}, **extra)
        assert term.teacher_layers  # known before setup: the teacher cache is off for these terms
        loss = value(term, student, teacher, x)  # 16 wide, 1 block against 32 wide, 3 blocks
        assert loss > 0
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        student.zero_grad()
        # the teacher against itself: nothing to learn
        assert float(value(kind({teacher_layer: teacher_layer}, **extra), teacher, teacher, x)) < 1e-6
    with pytest.raises(ConfigError, match="has no layer"):
        AttentionRelation({"encoder.layer.9": teacher_layer}).setup(student, teacher, x)


def test_sequence_level_kd_trains_on_the_teachers_own_continuations(store, tmp_path, monkeypatch):
    from kdpipe.distill.sequence import generate

    torch.manual_seed(0)
    teacher = causal_lm([8], 300, layers=1, width=16, heads=2).eval()
    x = torch.tensor([[1, 10, 11, 12, 13, 0, 0, 0], [1, 20, 21, 22, 23, 24, 25, 26]])
    y = torch.tensor([[10, 11, 12, 13, 2, UNLABELED, UNLABELED, UNLABELED], [20, 21, 22, 23, 24, 25, 26, 27]])
    gx, gy = generate(teacher, x, y, prefix_tokens=3)
    assert torch.equal(gx[:, :3], x[:, :3])  # the prefix is the document's
    assert (gx[0, 6:] == 0).all() and (gy[0, 5:] == UNLABELED).all()  # no longer than the document
    with torch.no_grad():  # greedy: each generated token is the teacher's argmax given what precedes it
        for t in range(3, 8):
            live = gy[:, t - 1] != UNLABELED
            assert torch.equal(teacher(gx[:, :t])[:, -1].argmax(-1)[live], gy[live, t - 1])
    runs = language_model_pipeline(tmp_path, monkeypatch, 80, "distill=sequence_kd",
                                   "distill.scheme.prefix_tokens=3", "quantize=none")
    assert runs["distill"].data.tags["kdpipe.sequences"] == "computed"
    stored = [f.path for f in MlflowClient().list_artifacts(runs["teacher"].info.run_id, "synthetic")]
    assert len(stored) == 1 and stored[0].startswith("synthetic/sequences_")
    assert runs["distill"].data.metrics["test/ppl"] < 300


def test_text_configs_that_cannot_run_are_refused_in_one_line():
    from hydra import compose, initialize_config_dir

    from kdpipe.cli import CONFIG_PATH
    from kdpipe.config import validate

    def cfg(*overrides):
        with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
            return compose("config", overrides=list(overrides))

    with pytest.raises(ConfigError, match="student.model reads data.channels.*student=transformer_small"):
        validate(cfg("data=fortunes_topics", "teacher=transformer"))
    with pytest.raises(ConfigError, match="next-token logits per position.*causal_lm"):
        validate(cfg("data=fortunes_lm", "teacher=transformer", "student=causal_lm_small"))
