"""EVA, Explained Variance Adaptation (arXiv 2410.07170): A from the data the layer will see.

Letters: K in_features, N tokens of a batch that carry a label (padding and prompt tokens are left
out, PEFT's use_label_mask), k = round(r * rho) the most directions a layer may take, r the LoRA rank.

For a target layer with inputs x (N, K), EVA sets A (r, K) to the top-r principal directions of
the inputs seen over the first batches of the training data, and B = 0, so the model starts at W0
and the first updates B A x act where the inputs vary most:

    X = [x_1; x_2; ...] (all tokens seen),  mu = mean of the rows,  X - 1 mu^T = U S V^T
    A = V_r^T   (the right-singular vectors of the centred inputs: orthonormal rows)

The SVD is incremental (Ross et al. 2008, scikit-learn's IncrementalPCA, which PEFT's follows), so
no layer's inputs are kept: after n rows the state is V_k (k, K), S_k (k,), mu (K,); a batch Y
(m, K) with mean mu_Y updates it through the SVD of the (k + m + 1, K) matrix

    [ diag(S_k) V_k^T ;  Y - 1 mu_Y^T ;  sqrt(n m / (n + m)) (mu - mu_Y)^T ]

whose Gram matrix is the centred scatter of all n + m rows with the old rows replaced by their rank-k
part: the last row is the scatter between the two means (n (mu - mu')(mu - mu')^T + m (mu_Y -
mu')(mu_Y - mu')^T = n m / (n + m) (mu - mu_Y)(mu - mu_Y)^T, mu' the new mean). Each direction's sign
is fixed so that its largest entry is positive. The explained variance ratio of direction i is
S_i^2 / sum of the per-feature variances times the row count.

Stopping: a layer's directions have converged when each of its first r_l directions has cosine
similarity >= tau (0.99) with the same direction one batch earlier; batches run (cycling the data,
as PEFT's loop does) until every layer has converged; a converged layer skips its SVD.

Ranks: each layer may take up to k = round(r rho) directions; the budget is r per layer, and the
budget's directions go to the largest explained variance ratios over all layers (rho = 1: exactly r
each, the default). A layer given r_l != r gets alpha_l = alpha r_l / r, so that the scaling alpha / r
is unchanged (PEFT's adjust_scaling_factors); a layer given 0 directions loses its LoRA.

Layers whose inputs are equal (q, k and v projections; gate and up) share one SVD, found by comparing
their inputs on the first batch; within such a group the SVD's owner (the first) takes the group's
largest rank. All of this is PEFT 0.21's initialize_lora_eva_weights, decision for decision, with the
exact SVD in float64 where PEFT takes a randomized one (torch.svd_lowrank) in float32;
tests/test_inits_eva.py compares the two with PEFT's SVD made exact.
"""

from __future__ import annotations

import itertools
import json
import math
import os

import torch
import torch.nn as nn

from minilora.data.packing import IGNORE

MAX_BATCHES = 1000  # of epoch 0, cycled until the directions converge


class EvaError(ValueError):
    """EVA cannot initialise with these batches or flags (a one-sentence reason)."""


class IncrementalSVD:
    """The incremental SVD of the module docstring for one layer's inputs, in float64."""

    def __init__(self, k: int):
        self.k = k
        self.n = 0  # rows seen
        self.mean = self.var = None  # (K,) float64
        self.components = None  # (k, K): V_k^T, rows the directions
        self.singular = None  # (k,)
        self.ratio = None  # (k,) explained variance ratios
        self.converged = torch.zeros(k, dtype=torch.bool)  # per direction, against the previous batch

    def update(self, y: torch.Tensor, tau: float) -> None:
        y = y.double()  # (m, K)
        m = y.shape[0]
        n, total = self.n, self.n + m
        mean_y = y.mean(0)  # (K,)
        centred = y - mean_y
        var_y = centred.square().sum(0)  # (K,) m x the batch's variance
        if n == 0:
            mean, var, stacked = mean_y, var_y / m, centred
        else:
            mean = (n * self.mean + m * mean_y) / total
            # Chan et al.'s pairwise update of the summed squared deviations
            var = (n * self.var + var_y + (n * m / total) * (self.mean - mean_y).square()) / total
            shift = math.sqrt(n * m / total) * (self.mean - mean_y)  # (K,)
            stacked = torch.cat([self.singular[:, None] * self.components, centred, shift[None]])  # (k+m+1, K)
        _, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
        big = Vh.abs().argmax(1)  # (k',) the largest entry of each direction
        Vh = Vh * torch.sign(Vh[torch.arange(Vh.shape[0]), big])[:, None]  # made positive
        previous = self.components
        self.components, self.singular = Vh[: self.k], S[: self.k]
        self.ratio = S[: self.k].square() / (var * total).sum()
        self.n, self.mean, self.var = total, mean, var
        if previous is not None:
            # a batch smaller than k gives fewer directions; one not seen before has not converged
            j = min(len(previous), len(self.components))
            cos = torch.nn.functional.cosine_similarity(self.components[:j], previous[:j])  # (j,)
            self.converged = torch.zeros(self.k, dtype=torch.bool)
            self.converged[:j] = cos >= tau


def label_mask(batch) -> torch.Tensor:
    """(B, T) bool: the tokens whose inputs EVA fits, real tokens that carry a label."""
    return batch.attention_mask.bool() & (batch.labels != IGNORE)


@torch.no_grad()
def _forward(model: nn.Module, batch) -> None:
    """One forward of `batch` for the hooks, the LoRA terms off (B = 0 at init anyway), no logits."""
    from minilora.lora.surgery import lora_disabled

    with lora_disabled(model):
        model(
            batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask,
            segment_ids=batch.segment_ids,
            return_hidden=True,
        )


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: dict[str, nn.Module], batch) -> dict[str, torch.Tensor]:
    """{name: (N, K) the inputs of layers[name] at the labelled tokens} from one forward of `batch`
    (the caller sets eval mode)."""
    mask = label_mask(batch)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda mod, args, out: seen.__setitem__(name, args[0][mask])  # (N, K)

    hooks = [layer.register_forward_hook(keep(name)) for name, layer in layers.items()]
    try:
        _forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def equal_input_owners(model: nn.Module, layers: dict[str, nn.Module], batch) -> dict[str, str]:
    """{name: the first layer whose inputs on `batch` equal this layer's} (itself if none). Each input
    (N, K) is compared through its product with one random vector (K,): equal inputs give equal
    products bit for bit, unequal ones differ but with probability zero, and only (N,) is kept."""
    gen = torch.Generator().manual_seed(0)
    probes: dict[int, torch.Tensor] = {}
    prints: dict[str, torch.Tensor] = {}
    mask = label_mask(batch)
    hooks = []

    def keep(name):
        def hook(mod, args, out):
            x = args[0][mask]  # (N, K)
            k = x.shape[-1]
            if k not in probes:
                probes[k] = torch.randn(k, generator=gen, dtype=torch.float64)
            prints[name] = x.double() @ probes[k].to(x.device)  # (N,)

        return hook

    for name, layer in layers.items():
        hooks.append(layer.register_forward_hook(keep(name)))
    try:
        _forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    owner: dict[str, str] = {}
    for name in layers:
        owners = dict.fromkeys(owner.values())
        owner[name] = next((o for o in owners if torch.equal(prints[o], prints[name])), name)
    return owner


def distribute(ratios: dict[str, torch.Tensor], owner: dict[str, str], budget: int) -> dict[str, int]:
    """Ranks per layer: the `budget` largest explained variance ratios over all layers (a layer shares
    its owner's ratios), ties in layer order; then each owner takes its group's largest rank."""
    names = sorted(owner, key=lambda n: owner[n] != n)  # owners first, as PEFT lists them (stable)
    values = torch.cat([ratios[owner[n]] for n in names])  # (sum of k,)
    who = [n for n in names for _ in range(len(ratios[owner[n]]))]
    order = torch.sort(values, descending=True, stable=True).indices[:budget]
    ranks = dict.fromkeys(names, 0)
    for i in order.tolist():
        ranks[who[i]] += 1
    for name in names:  # PEFT's swap: the owner of a group holds its largest rank
        o = owner[name]
        if ranks[o] < ranks[name]:
            ranks[o], ranks[name] = ranks[name], ranks[o]
    return ranks


def fit(
    model: nn.Module, batches, r: int, rho: float = 1.0, tau: float = 0.99, max_batches: int = MAX_BATCHES, say=None
):
    """({name: A (r_l, K) float32}, {name: r_l}) for every LoRA layer of `model` from `batches` (a list of
    packing.Batch, cycled; the module docstring's algorithm). `say(text)` reports progress."""
    from minilora.lora.surgery import lora_modules

    layers = lora_modules(model)
    k = round(r * rho)
    for name, layer in layers.items():
        if k > layer.in_features:
            raise EvaError(
                f"--init eva takes round(r x rho) = {k} directions of {name}'s {layer.in_features} inputs; "
                "lower --lora-r or --eva-rho."
            )
    check_batches(batches, r, rho)
    was_training = model.training
    model.eval()
    try:
        owner = equal_input_owners(model, layers, next(b for b in batches if int(label_mask(b).sum()) >= k))
        svds = {o: IncrementalSVD(k) for o in dict.fromkeys(owner.values())}
        ranks = dict.fromkeys(layers, k)
        last = None
        for i, batch in enumerate(itertools.cycle(batches)):
            todo = [o for o, s in svds.items() if not bool(s.converged[: ranks[o]].all())]
            if say is not None and (len(todo) != last or not todo):  # when the count changes
                say(f"eva: batch {i + 1}: {len(svds) - len(todo)}/{len(svds)} input groups converged")
            last = len(todo)
            if not todo:
                break
            if i >= max_batches:  # PEFT cycles for ever
                raise EvaError(
                    f"--init eva: {len(todo)} layers' directions did not converge (cosine >= {tau}) within "
                    f"{max_batches} batches; lower --eva-tau or use --init default."
                )
            for o, y in layer_inputs(model, {o: layers[o] for o in todo}, batch).items():
                if y.shape[0] >= k:  # fewer rows than directions: no SVD of this batch (PEFT skips it too)
                    svds[o].update(y, tau)
            if all(s.components is not None for s in svds.values()):
                ranks = distribute({o: s.ratio for o, s in svds.items()}, owner, r * len(layers))
    finally:
        model.train(was_training)
    return {n: svds[owner[n]].components[: ranks[n]].float() for n in layers}, ranks


@torch.no_grad()
def set_ranks(model: nn.Module, ranks: dict[str, int], r: int) -> None:
    """Rebuild every LoRA layer whose EVA rank r_l differs from r at rank r_l, alpha x r_l / r (the
    scaling alpha / r kept); r_l = 0 puts the plain base layer back."""
    from minilora.lora.layers import LoRALinear
    from minilora.lora.surgery import lora_modules
    from minilora.models.loader import set_module

    with torch.random.fork_rng(devices=[]):  # the rebuilt layers' A is overwritten: leave the dropout stream alone
        _rebuild(model, lora_modules(model), ranks, r, set_module, LoRALinear)


def _rebuild(model, mods, ranks, r, set_module, LoRALinear) -> None:
    for name, m in mods.items():
        rl = ranks[name]
        if rl == m.r:
            continue
        if rl == 0:
            set_module(model, name, m.base)
            continue
        layer = LoRALinear(m.base, rl, m.alpha * rl / r, m.dropout_p, m.init, m.use_rslora, m.use_dora)
        set_module(model, name, layer)


@torch.no_grad()
def initialise(
    model: nn.Module, batches, r: int, rho: float = 1.0, tau: float = 0.99, say=None, max_batches: int = MAX_BATCHES
) -> dict[str, int]:
    """EVA on `model`'s LoRA layers (made with init "eva": B = 0): fit, set the ranks, A = the
    directions. Returns the ranks {name: r_l}."""
    from minilora.lora.surgery import lora_modules

    directions, ranks = fit(model, batches, r, rho, tau, max_batches, say)
    set_ranks(model, ranks, r)
    for name, m in lora_modules(model).items():
        m.lora_A.weight.copy_(directions[name])
        m.lora_B.weight.zero_()
    return ranks


def check_batches(batches, r: int, rho: float) -> None:
    """An EvaError unless some batch has at least round(r rho) labelled tokens: fewer rows than
    directions give no SVD (PEFT would then cycle its data for ever)."""
    k = round(r * rho)
    sized = max((int(label_mask(b).sum()) for b in batches), default=0)
    if sized < k:
        raise EvaError(
            f"--init eva needs a batch of at least {k} labelled tokens to find {k} directions per layer "
            f"(--lora-r x --eva-rho); the largest batch has {sized}; raise --batch-size or lower --lora-r."
        )


def peft_config(rho: float, tau: float) -> dict:
    """adapter_config.json's eva_config, PEFT's EvaConfig fields for what ran here."""
    return {
        "rho": rho,
        "tau": tau,
        "use_label_mask": True,
        "label_mask_value": IGNORE,
        "whiten": False,
        "adjust_scaling_factors": True,
    }


RANKS_FILE = "eva_ranks.json"  # in the run folder: a resume rebuilds these ranks without refitting


def save_ranks(run_dir: str, ranks: dict[str, int]) -> None:
    from minilora.fileio import write_text_atomic

    write_text_atomic(os.path.join(run_dir, RANKS_FILE), json.dumps(ranks, indent=1) + "\n")


def load_ranks(run_dir: str) -> dict[str, int] | None:
    path = os.path.join(run_dir, RANKS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def plan_note(step_time) -> str:
    """What --plan says --init eva costs before step 1; step_time: steptime.StepTime or None."""
    fwd = step_time.micro_batch / 3 if step_time is not None else None  # forward ~ 1/3 of forward + backward
    each = f", about {fwd:.2g} s each (a third of a micro-batch's forward and backward)" if fwd else ""
    return (
        "\n--init eva: before step 1, forward passes without backward over training batches until every layer's "
        f"directions converge: at least 3 (one finds layers with equal inputs, two compare){each}."
    )
