"""Pretrain a BERT encoder by masked-language modelling (Devlin et al. 2019) on unlabeled text, so a
text teacher knows more than its labeled data: what DistilBERT's and TinyBERT's teachers have and a
model trained from scratch on a few thousand labeled texts lacks. Writes `<out>/` with the encoder
(`save_pretrained`) and its byte-level BPE `tokenizer.json` (kdpipe's special tokens first, then
`<mask>`), for

    kdpipe data=fortunes_topics data.tokenizer=<out>/tokenizer.json teacher=transformer \
        teacher.model.pretrained=<out> student=transformer_small ...

    python scripts/pretrain_mlm.py --out W/mlm                 # English fortunes outside the topic task
    python scripts/pretrain_mlm.py --path corpus.txt --out W/mlm   # your text: any data=text_lm source
    python scripts/pretrain_mlm.py --out W/mlm --task data=fortunes_topics data.unlabeled=W/unlabeled.jsonl
    python scripts/pretrain_mlm.py --write-corpus W/unlabeled.jsonl   # the corpus only, as data.unlabeled

`--task <kdpipe data overrides>`: the corpus is that task's training split (as kdpipe splits it, at
its data.seed) plus its `data.unlabeled` texts, less copies of its validation and test texts, and
the tokenizer is trained on them (plus `<mask>`); every run of the task then takes it as
`data.tokenizer`. The domain-adaptive case: pretraining sees the task's texts, not their labels.

With the fortunes, the corpus is every English category that is not one of `fortunes_topics`'
classes, less any text that also appears in those classes (whatever its split), so nothing of the
task's validation or test texts is seen. 5 % of the corpus is held out: its masked-token loss per
epoch is printed and written to `<out>/history.json`, so the curve shows when to stop.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from kdpipe.data.text import SPECIAL_TOKENS, train_tokenizer
from kdpipe.data.text_sources import fortune_files, fortunes_samples, read_documents, read_fortunes, same_text

REPO = Path(__file__).resolve().parent.parent
ENGLISH = ("art computers cookie definitions disclaimer drugs education ethnic food fortunes goedel "
           "humorists kids law linux linuxcookie literature love magic medicine men-women miscellaneous "
           "news people perl pets platitudes politics riddles science songs-poems sports startrek wisdom "
           "work zippy").split()


def fortunes_corpus(root: Path) -> list[str]:
    """English fortunes of the categories outside fortunes_topics, without the topic task's texts."""
    topics = yaml.safe_load((REPO / "conf" / "data" / "fortunes_topics.yaml").read_text())["classes"]
    task = {same_text(t) for t in fortunes_samples(root, topics)[0]}
    used = {name for names in topics.values() for name in names}
    texts = [t for c in ENGLISH if c not in used for f in fortune_files(root, c) for t in read_fortunes(f)]
    unique = list(dict.fromkeys(t for t in texts if same_text(t) not in task))
    print(f"corpus: {len(unique)} fortunes from {len([c for c in ENGLISH if c not in used])} categories "
          f"({len(texts) - len(unique)} dropped: duplicates or texts of the topic task)")
    return unique


def task_corpus(overrides: list[str], args: argparse.Namespace) -> list[str]:
    """The training texts and unlabeled texts of the kdpipe text task `overrides` configure; the
    task's max_length, vocab_size and lowercase replace those of `args`, so the encoder fits it."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from kdpipe.data.text import TextDataModule

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    dm = instantiate(cfg.data)
    if not isinstance(dm, TextDataModule):
        raise SystemExit(f"--task {' '.join(overrides)}: data is {type(dm).__name__}, not a text "
                         f"classification task (data=fortunes_topics, data=text_files, ...)")
    args.max_length, args.vocab_size, args.lowercase = dm.max_length, dm.vocab_size, dm.lowercase
    train, unlabeled = dm.training_texts(dm.make_splits())
    print(f"corpus: {len(train)} training texts of the task + {len(unlabeled)} unlabeled texts")
    return list(dict.fromkeys(train + unlabeled))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="where the encoder and its tokenizer go")
    ap.add_argument("--write-corpus", type=Path, default=None, metavar="FILE",
                    help="write the corpus as JSONL (one {\"text\": ...} a line: a data.unlabeled file) "
                         "and stop, without pretraining")
    ap.add_argument("--path", default=None, help="a text_lm source (default: the English fortunes)")
    ap.add_argument("--fortunes", type=Path, default=Path("/usr/share/games/fortunes"))
    ap.add_argument("--task", nargs="+", default=None, metavar="OVERRIDE",
                    help="kdpipe data overrides of a text task: pretrain on its training and unlabeled texts")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=64, help="as the task's data.max_length")
    ap.add_argument("--vocab-size", type=int, default=4000)
    ap.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=True,
                    help="as the task's data.lowercase (fortunes_topics: true)")
    ap.add_argument("--epochs", type=int, default=30, help="30: the held-out loss is flat at the end")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if (args.out is None) == (args.write_corpus is None):
        ap.error("give --out DIR to pretrain, or --write-corpus FILE to write the corpus only")

    torch.manual_seed(args.seed)
    if args.task:
        texts = task_corpus(args.task, args)
    elif args.path:
        texts = [t for docs, _ in read_documents(args.path).values() for t in docs]
    else:
        texts = fortunes_corpus(args.fortunes)
    if args.write_corpus:
        args.write_corpus.parent.mkdir(parents=True, exist_ok=True)
        lines = (json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
        args.write_corpus.write_text("".join(lines))
        print(f"wrote {len(texts)} texts to {args.write_corpus}: data.unlabeled={args.write_corpus}")
        return
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        PreTrainedTokenizerFast,
    )

    random.Random(args.seed).shuffle(texts)
    n_val = max(1, len(texts) // 20)
    val_texts, train_texts = texts[:n_val], texts[n_val:]

    args.out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(train_texts, args.vocab_size, args.lowercase, extra_special=("<mask>",))
    tok.save(str(args.out / "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                     eos_token="<eos>", unk_token="<unk>", mask_token="<mask>")
    collate = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15)

    def batches(split: list[str], shuffle: bool):
        order = list(range(len(split)))
        if shuffle:
            random.shuffle(order)
        for i in range(0, len(order), args.batch_size):
            enc = hf_tok([split[j] for j in order[i:i + args.batch_size]], truncation=True,
                         max_length=args.max_length, padding=True, return_tensors="pt")
            yield collate([{"input_ids": ids, "attention_mask": m}
                           for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)])

    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=args.width,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        intermediate_size=4 * args.width,
                        max_position_embeddings=args.max_length, pad_token_id=SPECIAL_TOKENS.index("<pad>"),
                        type_vocab_size=1)
    model = BertForMaskedLM(config)

    def mlm_loss(batch: dict) -> torch.Tensor:
        """Cross-entropy at the masked positions only: the vocabulary projection, most of the cost
        at this size, is computed for the 15 % of tokens that are scored, not for every token."""
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        scored = batch["labels"] != -100
        return torch.nn.functional.cross_entropy(model.cls(hidden[scored]), batch["labels"][scored])
    steps = args.epochs * -(-len(train_texts) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.06,
                                                anneal_strategy="linear")
    history, t0 = [], time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        for batch in tqdm(list(batches(train_texts, True)), desc=f"epoch {epoch}/{args.epochs}", leave=False,
                          disable=None):
            loss = mlm_loss(batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        model.eval()
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(1234)  # the same masks each epoch: a comparable held-out loss
            losses = [mlm_loss(b).item() for b in batches(val_texts, False)]
        history.append({"epoch": epoch, "val_mlm_loss": sum(losses) / len(losses),
                        "seconds": round(time.time() - t0)})
        print(f"epoch {epoch}: held-out masked-token loss {history[-1]['val_mlm_loss']:.3f}", flush=True)
    model.save_pretrained(args.out)
    (args.out / "history.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "train_texts": len(train_texts),
                                                       "history": history}, indent=2))
    print(f"wrote {args.out}: teacher.model.pretrained={args.out} data.tokenizer={args.out}/tokenizer.json")


if __name__ == "__main__":
    main()
