#!/usr/bin/env python3
"""Writes a trimmed CLIP BPE vocabulary for the shapes-world model.

The trimmed files are a valid CLIP tokenizer: the 512 byte-level symbols, only those merges of the
real CLIP merge list that tokenizing the listed words applies (kept in their original order), and
the start/end tokens. BPE with a subset of merges gives exactly the same tokens for those words,
because every merge it skips was never chosen for them; any other word still tokenizes, into
smaller pieces. Ids are compact (about 640 instead of 49408), so the text encoder stays tiny.

Usage: python tools/shapes/trim_clip_vocab.py REAL_TOKENIZER_DIR OUT_DIR
(REAL_TOKENIZER_DIR holds the real vocab.json and merges.txt, e.g. fixtures/sd1-tiny/model/tokenizer)
"""
import json
import os
import sys

WORDS = """a an the photo picture image of and to left right above below on top under beneath over
underneath side next with in at by near behind front circle circles square squares triangle
triangles star stars heart hearts ring rings cross crosses diamond diamonds shape shapes one two
three , . ! ' "
""".split()


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe(word, ranks):
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pair = (symbols[i], symbols[i + 1])
        used.append(pair)
        merged, j = [], 0
        while j < len(symbols):
            if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == pair:
                merged.append(pair[0] + pair[1])
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols, used


def main():
    src, out = sys.argv[1], sys.argv[2]
    with open(os.path.join(src, "merges.txt"), encoding="utf-8") as f:
        lines = [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#version")]
    merges = [tuple(l.split()) for l in lines]
    ranks = {m: i for i, m in enumerate(merges)}
    b2u = bytes_to_unicode()
    used = set()
    for w in WORDS:
        enc = "".join(b2u[b] for b in w.encode("utf-8"))
        _, u = bpe(enc, ranks)
        used.update(u)
    kept = [m for m in merges if m in used]
    base = list(b2u.values())
    vocab_list = base + [v + "</w>" for v in base] + [a + b for a, b in kept] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in kept:
            f.write(f"{a} {b}\n")
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "do_lower_case": True,
                   "tokenizer_class": "CLIPTokenizer"}, f, indent=1)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>"}, f, indent=1)
    print(f"{len(vocab)} tokens, {len(kept)} merges")


if __name__ == "__main__":
    main()
