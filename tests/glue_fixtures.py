"""Tiny GLUE files in the standard layout of the GLUE download script (written by the tests)."""
import os

#: task -> (folder, header or None, row(i, label) -> fields, raw labels cycled, expected ids (hub order))
SPECS = {
    "cola": ("CoLA", None, lambda i, y: ["gj04", y, "", f"sentence {i} ."], ["1", "0"], [1, 0]),
    "sst2": ("SST-2", ["sentence", "label"], lambda i, y: [f"review {i} ok", y], ["0", "1"], [0, 1]),
    "mrpc": ("MRPC", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             lambda i, y: [y, str(100 + i), str(200 + i), f"first {i}", f"second {i}"], ["1", "0"], [1, 0]),
    "qqp": ("QQP", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            lambda i, y: [str(i), str(2 * i), str(2 * i + 1), f"q one {i}?", f"q two {i}?", y], ["0", "1"], [0, 1]),
    "stsb": ("STS-B", ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                       "sentence2", "score"],
             lambda i, y: [str(i), "main-news", "f", "2012", str(i), "none", "none", f"a {i}", f"b {i}", y],
             ["4.250", "0.5", "2.000", "5.0"], [4.25, 0.5, 2.0, 5.0]),
    "mnli": ("MNLI", ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                      "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
             lambda i, y: [str(i), "1", f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)",
                           f"premise {i}", f"hypothesis {i}", y, y],
             ["neutral", "contradiction", "entailment"], [1, 2, 0]),
    "qnli": ("QNLI", ["index", "question", "sentence", "label"],
             lambda i, y: [str(i), f"what {i}?", f"this {i}.", y], ["not_entailment", "entailment"], [1, 0]),
    "rte": ("RTE", ["index", "sentence1", "sentence2", "label"],
            lambda i, y: [str(i), f"text {i}", f"claim {i}", y], ["entailment", "not_entailment"], [0, 1]),
    "wnli": ("WNLI", ["index", "sentence1", "sentence2", "label"],
             lambda i, y: [str(i), f"the cup {i}", f"it {i}", y], ["1", "0"], [1, 0]),
}


def write_task(root, task, n=8, splits=None):
  """Writes ``<root>/glue/<Folder>/<split>.tsv`` with ``n`` rows each; returns ``(raw, expected)`` labels."""
  folder, header, row, raw, want = SPECS[task]
  splits = splits or (["train", "dev_matched", "dev_mismatched"] if task == "mnli" else ["train", "dev"])
  os.makedirs(os.path.join(root, "glue", folder), exist_ok=True)
  for split in splits:
    with open(os.path.join(root, "glue", folder, f"{split}.tsv"), "w") as f:
      if header:
        f.write("\t".join(header) + "\n")
      for i in range(n):
        f.write("\t".join(row(i, raw[i % len(raw)])) + "\n")
  return [raw[i % len(raw)] for i in range(n)], [want[i % len(want)] for i in range(n)]
