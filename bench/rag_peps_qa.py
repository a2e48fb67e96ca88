"""A retrieval evaluation set from the PEPs corpus, built without any model.

Known-item questions from each PEP's title and the first sentence of its Abstract; header-field
questions (first author, creation date, Python version) whose short answers appear verbatim in
the PEP; and multi-hop questions along the Requires / Replaces / Superseded-By headers, which
need both PEPs. Deterministic: the same corpus gives the same file.

    python bench/rag_peps_qa.py ../shared/data/python-peps/peps_final_active_accepted.jsonl --out peps_qa.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

LINKS = {  # header -> (question about the PEP titled X, what the answer is)
    "Requires": 'The PEP titled "{title}" requires another PEP. What is the title of the PEP it requires?',
    "Replaces": 'The PEP titled "{title}" replaces an earlier PEP. What is the title of the PEP it replaces?',
    "Superseded-By": 'The PEP titled "{title}" was superseded. What is the title of the PEP that supersedes it?',
}


def header(text: str) -> dict[str, str]:
    block = text.split("\n\n", 1)[0]
    return {k: " ".join(v.split()) for k, v in re.findall(r"^([A-Za-z-]+):[ \t]*(.*(?:\n[ \t]+.*)*)", block, re.M)}


def abstract_sentence(text: str) -> str | None:
    m = re.search(r"^Abstract\n=+\n\n(.+?)(?:\n\n|$)", text, re.M | re.S)
    if not m:
        return None
    paragraph = " ".join(m.group(1).split())
    sentence = re.split(r"(?<=[.!?])\s+", paragraph)[0]
    return sentence if len(sentence.split()) >= 6 else None


def questions(records: list[dict]) -> list[dict]:
    peps = {str(r["pep"]): r for r in records}
    heads = {n: header(r["text"]) for n, r in peps.items()}
    out = []
    for n, r in peps.items():
        h, title = heads[n], r["title"]
        out.append({"question": f'Which PEP is titled "{title}"?', "doc_ids": [n], "answer": f"PEP {n}", "kind": "title"})
        if sentence := abstract_sentence(r["text"]):
            out.append({"question": f'Which PEP says: "{sentence}"', "doc_ids": [n], "answer": f"PEP {n}", "kind": "abstract"})
        author = re.sub(r"\s*<[^>]*>", "", h.get("Author", "")).split(",")[0].strip()
        if author and author in r["text"]:
            out.append({"question": f"Who wrote PEP {n}?", "doc_ids": [n], "answer": author, "kind": "author"})
        if h.get("Created") and h["Created"] in r["text"]:
            out.append({"question": f"When was PEP {n} created?", "doc_ids": [n], "answer": h["Created"], "kind": "created"})
        if h.get("Python-Version") and h["Python-Version"] in r["text"]:
            out.append({"question": f"Which Python version is PEP {n} for?", "doc_ids": [n], "answer": h["Python-Version"],
                        "kind": "python-version"})
        for field, template in LINKS.items():
            for other in re.findall(r"\d+", h.get(field, "")):
                if other in peps and other != n:
                    out.append({"question": template.format(title=title), "doc_ids": [n, other],
                                "answer": peps[other]["title"], "kind": "multi-hop"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peps", help="peps_final_active_accepted.jsonl")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    records = [json.loads(line) for line in Path(args.peps).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = questions(records)
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    kinds = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print(f"wrote {len(rows)} questions to {args.out}: {kinds}")


if __name__ == "__main__":
    main()
