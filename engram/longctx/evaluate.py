"""``engram eval long-context``: RULER-style tasks at several context lengths, answered by the project's
exact decoder (greedy, with the KV cache and the Engram decode state), scored by exact match; and the
loss on held-out documents longer than the training length.

Haystacks come from the checkpoint's held-out documents (its validation split, without synthetic
retrieval documents), tokenized with the checkpoint's own tokenizer. A sample of length L is the largest
haystack whose prompt, with the answer, fits in L tokens (``fit``); every (task, length) has ``samples``
samples with seeds 0..samples-1 of the run's ``seed``, so two models are asked exactly the same
questions.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable

import torch

from engram.data.bpe import with_bos
from engram.data.retrieval import TASKS, Sample, filler_lines, make_sample, score, text_lines
from engram.fileio import atomic_write_json, atomic_write_text

GenerateFn = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, max new tokens) -> continuations


def held_out_texts(data_config) -> list[str]:
    """The real documents of the validation split (synthetic retrieval and recall documents left out)."""
    from engram.data.corpus import load_documents

    return [d.text for d in load_documents(data_config)["val"] if not d.name.startswith(("retrieval/", "recall/"))]


def fit(task: str, seed: int, texts: list[str], length: int, encode: Callable[[str], list[int]],
        bos: int | None, lines: list[str] | None = None) -> tuple[Sample, list[int]]:
    """The sample of ``task``/``seed`` with the largest haystack such that [bos] + prompt + answer + "." is
    at most ``length`` tokens; returns it and its prompt ids. The keys and needle positions do not
    depend on the size, so the search only grows the haystack."""
    rng = random.Random(f"haystack:{task}:{seed}")
    word_task = task in ("cwe", "fwe")
    filler = [] if word_task else filler_lines(texts, rng, length, lines)  # a line is >= 1 token: enough

    def tokens(size: int) -> tuple[Sample, list[int], int]:
        sample = make_sample(task, seed, filler, size)
        ids = with_bos(encode(sample.prompt), bos)
        return sample, ids, len(ids) + len(encode(sample.answer + "."))

    lo, hi = 0, max(1, length)  # sizes: lines or words; find the largest that fits
    best = tokens(lo)
    if best[2] > length:
        raise ValueError(f"{task}: even an empty haystack needs {best[2]} tokens, more than the length {length}")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        found = tokens(mid)
        if found[2] <= length:
            lo, best = mid, found
        else:
            hi = mid - 1
    return best[0], best[1]


def run_tasks(generate: GenerateFn, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
              bos: int | None, texts: list[str], lengths: list[int], tasks: list[str], samples: int,
              seed: int = 0, batch_size: int = 8, progress: bool = False) -> dict:
    """Every (task, length): ``samples`` prompts, their continuations by ``generate`` and the scores.
    Returns {"accuracy": {task: {length: {exact, partial, n}}}, "examples": [...]} ."""
    from tqdm.auto import tqdm

    results: dict = {"accuracy": {t: {} for t in tasks}, "examples": []}
    jobs = [(t, L) for L in lengths for t in tasks]
    lines = text_lines(texts)
    bar = tqdm(total=len(jobs) * samples, desc="long-context", unit="sample", disable=not progress)
    for task, L in jobs:
        built = [fit(task, seed * 100_000 + i, texts, L, encode, bos, lines) for i in range(samples)]
        exact, partial = [], []
        for start in range(0, len(built), batch_size):
            chunk = built[start: start + batch_size]
            outs = _continuations(generate, chunk, encode, L)
            for k, ((sample, ids), out) in enumerate(zip(chunk, outs)):
                text = decode(out)
                ok, share = score(sample, text)
                exact.append(ok)
                partial.append(share)
                if start == 0 and k == 0:  # each (task, length)'s first sample, to read what the model wrote
                    results["examples"].append({"task": task, "length": L, "prompt_tokens": len(ids),
                                                "query": sample.query, "answer": sample.answer.strip(),
                                                "generated": text})
            bar.update(len(chunk))
        results["accuracy"][task][str(L)] = {"exact": sum(exact) / len(exact), "partial": sum(partial) / len(partial),
                                             "n": len(exact)}
    bar.close()
    return results


def _continuations(generate: GenerateFn, chunk: list[tuple[Sample, list[int]]], encode, length: int) -> list:
    """Greedy continuations of a chunk's prompts: the answer's tokens and two more, batched; a prompt
    that leaves less room in ``length`` (``fit`` guarantees room for its own answer) goes alone."""
    room = max(len(encode(s.answer + ".")) for s, _ in chunk) + 2
    together = [i for i, (_, ids) in enumerate(chunk) if len(ids) + room <= length]
    outs: list = [None] * len(chunk)
    for i, out in zip(together, generate([chunk[i][1] for i in together], room) if together else []):
        outs[i] = out
    for i in range(len(chunk)):
        if outs[i] is None:
            outs[i] = generate([chunk[i][1]], length - len(chunk[i][1]))[0]
    return outs


def long_document_loss(model, encode: Callable[[str], list[int]], bos: int | None, texts: list[str],
                       lengths: list[int], max_docs: int = 16) -> dict:
    """Mean next-token loss over the first L tokens of held-out documents at least L tokens long, per L
    (documents alone, one per row, through the trainer's ``mean_loss``): {L: {loss, ppl, docs}}; lengths
    no document reaches get docs 0."""
    from engram.train.evaluation import mean_loss

    device = next(model.parameters()).device
    encoded = [with_bos(encode(t), bos) for t in texts]
    encoded.sort(key=len, reverse=True)
    out = {}
    for L in lengths:
        docs = [ids[:L] for ids in encoded if len(ids) >= L][:max_docs]
        if not docs:
            out[str(L)] = {"loss": None, "ppl": None, "docs": 0}
            continue
        mean, _ = mean_loss(model, ((torch.tensor([ids]), None) for ids in docs), device)
        out[str(L)] = {"loss": mean, "ppl": math.exp(mean), "docs": len(docs)}
    return out


def markdown(result: dict) -> str:
    lengths = result["lengths"]
    lines = [f"# Long-context evaluation of {result['checkpoint']} (step {result['step']})", "",
             f"{result['samples']} samples per task and length, seed {result['seed']}; exact match (partial credit "
             "in brackets).", "", "| task | " + " | ".join(str(L) for L in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for task, row in result["accuracy"].items():
        cells = [f"{100 * row[str(L)]['exact']:.1f} ({100 * row[str(L)]['partial']:.0f})" for L in lengths]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    if result.get("perplexity"):
        lines += ["", "| long-document loss | " + " | ".join(str(L) for L in lengths) + " |",
                  "|---|" + "---|" * len(lengths),
                  "| loss (docs) | " + " | ".join(
                      "-" if v["loss"] is None else f"{v['loss']:.3f} ({v['docs']})"
                      for v in (result["perplexity"][str(L)] for L in lengths)) + " |"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from engram.plotting import pyplot, save_figure

    plt = pyplot()
    lengths = result["lengths"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for task, row in result["accuracy"].items():
        axes[0].plot(lengths, [100 * row[str(L)]["exact"] for L in lengths], marker="o", label=task)
    axes[0].set(xscale="log", xlabel="context length (tokens)", ylabel="exact match (%)", ylim=(-2, 102),
                title="RULER-style tasks")
    axes[0].set_xticks(lengths, [str(L) for L in lengths])
    axes[0].legend(fontsize=7)
    ppl = result.get("perplexity") or {}
    have = [L for L in lengths if ppl.get(str(L), {}).get("loss") is not None]
    axes[1].plot(have, [ppl[str(L)]["loss"] for L in have], marker="o")
    axes[1].set(xscale="log", xlabel="document length (tokens)", ylabel="mean loss (nats)",
                title="held-out documents")
    if have:
        axes[1].set_xticks(have, [str(L) for L in have])
    save_figure(fig, path)


def evaluate_long_context(ckpt_path: str, lengths: list[int], tasks: list[str], samples: int, seed: int,
                          out_dir: str | None, device: str = "cpu", batch_size: int = 8, ppl_docs: int = 16,
                          progress: bool = True) -> dict:
    """The command: load the checkpoint, run the tasks and the long-document loss, write
    ``long_context.json``, ``long_context.md`` and ``long_context.png`` to ``out_dir``."""
    from engram.data.bpe import special_ids
    from engram.infer import generate_batch
    from engram.train import load_checkpoint

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    ckpt = load_checkpoint(ckpt_path, device=device)
    context = ckpt.run_config.model.backbone.max_seq_len
    too_long = [L for L in lengths if L > context]
    if too_long:
        raise ValueError(f"length(s) {too_long} exceed the model's context of {context} tokens "
                         "(extend it first: engram train --init-from with a longer max_seq_len and rope_scaling)")
    tok = ckpt.tokenizer
    bos = special_ids(tok).bos
    stop = special_ids(tok).eos

    def encode(text: str) -> list[int]:
        return tok.encode(text).ids

    def decode(ids: list[int]) -> str:
        return tok.decode(ids)

    def generate(prompts, max_new):
        return generate_batch(ckpt.model, prompts, max_new, temperature=0.0,
                              stop_ids={stop} if stop is not None else None)

    texts = held_out_texts(ckpt.data_config)
    result = {"checkpoint": str(ckpt.path), "step": ckpt.step, "lengths": lengths, "tasks": tasks,
              "samples": samples, "seed": seed, "context": context,
              "rope_scaling": None if ckpt.run_config.model.backbone.rope_scaling is None
              else ckpt.run_config.model.backbone.rope_scaling.to_dict()}
    result |= run_tasks(generate, encode, decode, bos, texts, lengths, tasks, samples, seed, batch_size, progress)
    result["perplexity"] = long_document_loss(ckpt.model, encode, bos, texts, lengths, ppl_docs)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "long_context.json", result)
        atomic_write_text(out / "long_context.md", markdown(result))
        plot(result, out / "long_context.png")
    return result

