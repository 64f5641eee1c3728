"""Mechanistic analysis of trained models (docs/ALGORITHM.md §5): what does Engram's memory do inside the network?

One module per ``engram inspect`` verb, each with its entry point ``inspect_<verb>``:

    gates       per-token gate values of a text (HTML, PNG) and the highest-gated n-grams
    knockout    static-pattern vs in-context probes scored with Engram's output zeroed: retention
    logit_lens  KL(final || block) per block: how early the prediction is finished
    cka         linear CKA between a baseline's and an Engram model's blocks, the alignment index
    tables      row usage (Zipf), collision rates and their controls, losses with the controls

``hooks`` holds what several verbs share: forward hooks that are removed on exit, validation windows.
Research code: it uses the library, and the library never imports it.
"""
