"""Text classification data: (text, label) samples tokenised into fixed-length id sequences.

The tokenizer is a byte-level BPE trained with Hugging Face `tokenizers` on the training split
only (nothing of val/test leaks into it) and cached on disk like the image statistics, keyed by
the training texts and its settings; or a `tokenizer.json` a user already has (`data.tokenizer`).
Ids are padded with `PAD_ID` (0) to `max_length`; models mask the padding themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from kdpipe import cache_dir
from kdpipe.data.base import TEXT_EXAMPLE_TOKEN, UNLABELED, TensorDataModule, splits_fingerprint
from kdpipe.data.text_sources import class_names, fortunes_samples, read_documents, read_samples, same_text
from kdpipe.errors import ConfigError

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens, before any merge
assert TEXT_EXAMPLE_TOKEN == len(SPECIAL_TOKENS)  # the first id after them


def train_tokenizer(texts: list[str], vocab_size: int, lowercase: bool = False, extra_special: tuple = ()):
    """A byte-level BPE (any script, no unknown characters) with kdpipe's special tokens first,
    so `<pad>` is id 0, then `extra_special` ones (the task tokens of multi-task data)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    steps = [normalizers.NFKC(), *([normalizers.Lowercase()] if lowercase else [])]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *extra_special],
                                  min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike):
    """A `tokenizer.json` (or a folder holding one, as `save_pretrained` writes it)."""
    from tokenizers import Tokenizer

    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ConfigError(f"data.tokenizer={path}: no tokenizer.json there; give the file (or its folder), "
                          f"or data.tokenizer=null to train one on the training split")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
        why = " ".join(str(exc).split())
        raise ConfigError(f"data.tokenizer={p} is not a tokenizers file: {why}") from exc


class TextDataModule(TensorDataModule):
    """Samples from `path` (kdpipe.data.text_sources: class folders, CSV, JSONL, a datasets
    folder), split with the seed into train/val/test (the source's own splits are kept), each
    text turned into `max_length` token ids. `vocab_size` is the tokenizer's (and the models'
    embedding) size."""

    kind = "classification"

    def __init__(self, path: str | None = None, num_classes: int = 2, max_length: int = 64,
                 vocab_size: int = 4000, tokenizer: str | None = None, lowercase: bool = False,
                 text_key: str = "text", label_key: str = "label", augment: list | None = None,
                 unlabeled: str | None = None, **kwargs) -> None:
        if augment:
            raise ConfigError(f"data.augment={list(augment)}: the batch augmentations are for images; "
                              f"text data takes data.augment=[]")
        super().__init__(1, 1, max_length, num_classes, **kwargs)
        if max_length < 2:
            raise ConfigError(f"data.max_length={max_length}: a sequence needs at least 2 tokens")
        if vocab_size < MIN_VOCAB and not tokenizer:
            raise ConfigError(f"data.vocab_size={vocab_size}: the byte-level tokenizer starts from 256 byte "
                              f"tokens and {len(SPECIAL_TOKENS)} special ones; set data.vocab_size >= "
                              f"{MIN_VOCAB}")
        self.in_shape = (max_length,)
        self.path, self.max_length, self.vocab_size = path, int(max_length), int(vocab_size)
        self.tokenizer_path, self.lowercase = tokenizer, bool(lowercase)
        self.text_key, self.label_key = text_key, label_key
        self.unlabeled = unlabeled
        self.classes: list[str] | None = None

    def samples(self) -> dict[str, tuple[list[str], list]]:
        """The texts and labels of each split the source defines (`all` when none)."""
        return read_samples(self.path, self.text_key, self.label_key)

    def make_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        found = self.samples()
        labels_all = [v for _, labels in found.values() for v in labels]
        self.classes = class_names(labels_all, self.num_classes, str(self.path))
        index = {name: i for i, name in enumerate(self.classes or [])}
        self._texts: list[str] = []
        parts = {}
        for name, (texts, labels) in found.items():
            start = len(self._texts)
            self._texts += texts
            y = [index[str(v)] if self.classes else int(v) for v in labels]
            parts[name] = (torch.arange(start, start + len(texts)), torch.tensor(y, dtype=torch.long))
        self._parts = parts  # the base class splits these index tensors into the texts
        return super().make_splits()

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._parts["all"]

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        return None if "all" in self._parts else dict(self._parts)

    def unlabeled_texts(self) -> list[str]:
        """Texts with no label (`data.unlabeled`: any source `data=text_lm` reads), for the transfer
        set only: a distilled student learns the teacher's outputs on them; the teacher and a
        student from labels never see them."""
        if not self.unlabeled:
            return []
        return [t for docs, _ in read_documents(self.unlabeled, self.text_key, "data.unlabeled").values()
                for t in docs]

    def training_texts(self, splits: dict) -> tuple[list[str], list[str]]:
        """The texts of the training split (`make_splits`' index tensors) and the unlabeled ones,
        less any copy of a validation or test text (it would leak into training): what the
        tokenizer is trained on, and what scripts/pretrain_mlm.py pretrains on with `--task`."""
        extra = self.unlabeled_texts()
        if extra:
            held_out = {same_text(self._texts[i]) for k in ("val", "test") for i in splits[k][0].tolist()}
            extra = [t for t in extra if same_text(t) not in held_out]
        return [self._texts[i] for i in splits["train"][0].tolist()], extra

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self.make_splits()
        train_texts, extra = self.training_texts(splits)
        self.tokenizer = self.build_tokenizer(train_texts + extra)
        splits = {k: self.encode_split([self._texts[i] for i in idx.tolist()], y)
                  for k, (idx, y) in splits.items()}
        splits["train"] = self._hide_labels(*splits["train"])
        if extra:  # after the labels are hidden: labeled_fraction counts the labeled split only
            x, y = splits["train"]
            splits["train"] = (torch.cat([x, self.encode(extra)]),
                               torch.cat([y, torch.full((len(extra),), UNLABELED, dtype=y.dtype)]))
        self.fingerprint = splits_fingerprint(splits)
        self.mean = self.std = None  # token ids are not standardised
        self.set_splits(splits)

    def build_tokenizer(self, train_texts: list[str]):
        """The user's tokenizer, or one trained on the training texts, cached under
        `$KDPIPE_CACHE_DIR/tokenizers` keyed by those texts and the settings."""
        if self.tokenizer_path:
            tok = load_tokenizer(self.tokenizer_path)
            if tok.get_vocab_size() > self.vocab_size:
                raise ConfigError(f"data.tokenizer has {tok.get_vocab_size()} tokens but data.vocab_size="
                                  f"{self.vocab_size}; set data.vocab_size={tok.get_vocab_size()}")
            self.pad_id = tok.token_to_id("<pad>") if tok.token_to_id("<pad>") is not None else PAD_ID
            self.tokenizer_cached = None
            return tok
        extra = tuple(getattr(self, "extra_special", ()))
        digest = hashlib.sha256(json.dumps({"v": self.vocab_size, "lower": self.lowercase,
                                            "special": list(extra)}).encode())
        for t in train_texts:
            digest.update(t.encode("utf-8", "replace") + b"\0")
        cache = cache_dir("tokenizers") / f"{digest.hexdigest()[:20]}.json"
        self.tokenizer_cached = cache.is_file()
        if self.tokenizer_cached:
            tok = load_tokenizer(cache)
        else:
            tok = train_tokenizer(train_texts, self.vocab_size, self.lowercase, extra)
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                tok.save(str(tmp))
                os.replace(tmp, cache)  # atomic: a parallel job reads the old file or the new one
            except OSError:  # a read-only home: training it again is cheap
                pass
        self.pad_id = PAD_ID
        return tok

    def encode_split(self, texts: list[str], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(texts), labels

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, max_length) int64 ids: truncated, padded with the pad id."""
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for i, enc in enumerate(self.tokenizer.encode_batch(texts)):
            ids = enc.ids[: self.max_length]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def _check_shape(self, split) -> None:  # ids have the configured length by construction
        return None

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """Sequences of the full `max_length` (no padding): what latency is measured on, and the
        shape models are traced and exported with."""
        return torch.full((batch, self.max_length), TEXT_EXAMPLE_TOKEN, dtype=torch.long)


class FortunesDataModule(TextDataModule):
    """Debian's fortunes as a classification task: each class is a list of fortune files or
    language folders under `root` (`data=fortunes_topics`: English categories;
    `data=fortunes_language`: one folder per language). At most `max_per_class` fortunes per
    class, drawn the same way on every machine."""

    def __init__(self, root: str = "/usr/share/games/fortunes", classes: dict | None = None,
                 max_per_class: int | None = None, **kwargs) -> None:
        if not classes:
            raise ConfigError("data.classes is empty; map each class to fortune files or folders, "
                              "e.g. {computers: [computers], science: [science]}")
        super().__init__(path=root, **kwargs)
        self.fortune_classes = {str(k): list(v) for k, v in dict(classes).items()}
        self.max_per_class = max_per_class

    def samples(self) -> dict[str, tuple[list[str], list]]:
        return {"all": fortunes_samples(self.path, self.fortune_classes, self.max_per_class)}


class LanguageModelDataModule(TextDataModule):
    """Plain text for causal language modelling: documents (a `.txt` file's paragraphs, separated
    by blank lines; each `.txt` file of a folder; the `text_key` of a CSV / JSONL / datasets
    source; or fortunes, one per document), split with the seed, each turned into `<bos> text
    <eos>` cut to `max_length + 1` tokens. A sample is `(ids[:-1], ids[1:])`: the model predicts
    every next token; padding positions of the target are `UNLABELED` and count nowhere.
    `num_classes` is the vocabulary size (what next-token accuracy is over)."""

    kind = "lm"

    def __init__(self, path: str | None = None, fortunes: list | None = None,
                 root: str = "/usr/share/games/fortunes", max_documents: int | None = None, **kwargs) -> None:
        kwargs.setdefault("num_classes", kwargs.get("vocab_size", 4000))
        if float(kwargs.get("labeled_fraction", 1.0)) != 1.0:
            raise ConfigError("data.labeled_fraction is for classification; a language model's targets are "
                              "the text itself: leave it at 1.0")
        if kwargs.get("unlabeled"):
            raise ConfigError("data.unlabeled is for classification; a language model learns from all its "
                              "text: add the texts to data.path instead")
        super().__init__(path=path, **kwargs)
        if int(self.num_classes) != self.vocab_size:
            raise ConfigError(f"data.num_classes={self.num_classes} must equal data.vocab_size="
                              f"{self.vocab_size} for language modelling (next-token classes)")
        self.fortunes, self.root, self.max_documents = list(fortunes or []), root, max_documents

    def samples(self) -> dict[str, tuple[list[str], list]]:
        if self.fortunes:
            docs, _ = fortunes_samples(self.root, {"text": self.fortunes})
            found = {"all": docs}
        else:
            found = {k: texts for k, (texts, _) in read_documents(self.path, self.text_key).items()}
        if self.max_documents:
            found = {k: v[: int(self.max_documents)] for k, v in found.items()}
        return {k: (v, [0] * len(v)) for k, v in found.items()}

    def encode_split(self, texts: list[str], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.max_length
        x = torch.full((len(texts), n), self.pad_id, dtype=torch.long)
        y = torch.full((len(texts), n), UNLABELED, dtype=torch.long)
        for i, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            ids = torch.tensor([BOS_ID, *enc.ids, EOS_ID][: n + 1], dtype=torch.long)
            x[i, : len(ids) - 1] = ids[:-1]
            y[i, : len(ids) - 1] = ids[1:]
        return x, y

    def _hide_labels(self, x, y):
        return x, y

    def example_input(self, batch: int = 1) -> torch.Tensor:
        x = super().example_input(batch)
        x[:, 0] = BOS_ID
        return x


class MultiTaskTextDataModule(TextDataModule):
    """Several text classification tasks as one data set, for one student with a head per task
    (kdpipe.models.multitask). `tasks` maps each task's name to a text data module (any of the
    above, built from its config); their samples share one tokenizer, trained on every task's
    training texts. Each sample's first token is its task's (`<task0>`, ...) and its label is global:
    task k's classes come after those of the tasks before it (`task_ranges`). `num_classes` is the
    sum of the tasks'. The metrics are also logged per task (`val/acc_<task>`, `test/acc_<task>`)."""

    def __init__(self, tasks: dict, max_per_class: int | None = None, **kwargs) -> None:
        if kwargs.get("unlabeled"):
            raise ConfigError("data.unlabeled is not supported for multi-task data (an unlabeled text has "
                              "no task); leave it null")
        # max_per_class: read by the tasks' configs (`${...max_per_class}`), one knob for all of them
        if not tasks or len(tasks) < 2:
            raise ConfigError("data.tasks needs at least two tasks, each a text data config")
        self.tasks = dict(tasks)
        sizes = {name: int(dm.num_classes) for name, dm in self.tasks.items()}
        total = sum(sizes.values())
        if int(kwargs.get("num_classes", total)) != total:
            raise ConfigError(f"data.num_classes={kwargs['num_classes']} but the tasks have {total} classes "
                              f"together ({sizes}); set data.num_classes={total}")
        kwargs["num_classes"] = total
        super().__init__(path="multitask", **kwargs)
        self.extra_special = tuple(f"<task{k}>" for k in range(len(self.tasks)))
        bounds, lo = {}, 0
        for name, n in sizes.items():
            bounds[name] = (lo, lo + n)
            lo += n
        self.task_ranges = bounds

    def samples(self) -> dict[str, tuple[list[str], list]]:
        texts, labels = [], []
        for name, dm in self.tasks.items():
            found = dm.samples()
            t = [v for part in found.values() for v in part[0]]
            y = [v for part in found.values() for v in part[1]]
            names = class_names(y, dm.num_classes, f"data.tasks.{name}")
            index = {c: i for i, c in enumerate(names or [])}
            lo = self.task_ranges[name][0]
            texts += t
            labels += [lo + (index[str(v)] if names else int(v)) for v in y]
        return {"all": (texts, labels)}

    def encode_split(self, texts: list[str], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.encode(texts)
        starts = torch.tensor([lo for lo, _ in self.task_ranges.values()])
        task = torch.bucketize(labels, starts, right=True) - 1
        base = self.tokenizer.token_to_id("<task0>")
        return torch.cat([(base + task).unsqueeze(1), ids[:, :-1]], 1), labels
