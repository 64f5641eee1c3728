"""Which parameters are hidden weight matrices: what Muon orthogonalises (``engram.train.optim``) and what
the memory planner counts as Muon's (``engram.distributed.plan``). A property of the model's modules, so
it lives with them and neither the trainer nor the planner imports the other.
"""

from __future__ import annotations

from torch import nn

from engram.model.engram import BranchLinear
from engram.model.moe import RoutedExperts
from engram.model.overencoding import OrderProjection

OPTIMIZERS = ("adamw", "muon")  # the dense optimizers: AdamW for every dense parameter, or Muon for the matrices

# The parameters Muon orthogonalises, by the module that owns them: matrices (out, in) and stacks of
# them (..., out, in), one matrix per routed expert, Engram branch or OverEncoding n-gram order.
MATRICES = {nn.Linear: ("weight",), RoutedExperts: ("w1", "w2", "w3"), BranchLinear: ("weight",),
            OrderProjection: ("weight",)}


def muon_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every hidden matrix, in ``model.named_parameters()`` order: the ``MATRICES``
    of each module, i.e. the weights of every ``nn.Linear`` (attention, FFNs, shared experts, routers,
    Engram's value projection, mHC's dynamic projection ``proj``), the routed experts' stacks and the
    Engram and OverEncoding projection stacks, except the LM head (``model.output``).

    Everything else is AdamW's under Muon: the token embedding and the head (Muon is for hidden
    layers), norms and biases, mHC's static biases and gating factors, Engram's depthwise conv taps (K
    per channel, no matrix). The hashed tables are SparseAdam's either way.
    """
    head = getattr(model, "output", None)
    chosen = {id(getattr(m, name)) for m in model.modules() if m is not head
              for kind, names in MATRICES.items() if isinstance(m, kind)
              for name in names if getattr(m, name, None) is not None}
    return [(n, p) for n, p in model.named_parameters() if id(p) in chosen and p.requires_grad]
