"""Activation patching on the same anchor as Weight Patching (docs/method.md, "Activation patching and roles").

Weight Patching swaps a component's *weights*; activation patching swaps a component's *output*:
the receiver (base) runs on a prompt while one component's output is overwritten with the value
that component produced when the specialized model ran on the same prompt. Scores use the same
anchor and the same normalization as the weight-space effect ``E_w`` (:meth:`AnchorScorer.effect`),
so the two numbers per component are directly comparable:

    E_act(c) = mean_x [ (F(base with out_c <- out_c(sft, x)), x) - F(base, x)) / G(x) ]

What "output" means per component (the **site** of the component) is declared by the
architecture description (its ``sites`` table) and answered by :meth:`ComponentSpace.site`:

================  ==================================================================================
component         site
================  ==================================================================================
``L5``            output of decoder block 5 (the residual stream at layer 5)
``L5.attn``       output of the declared attention module (before any post-attention norm and the
                  residual add)
``L5.mlp``        output of the declared MLP module (likewise)
``L5.<module>``   output of that submodule, when the module name is exactly one submodule
                  (``attn.q``, ``mlp.down``, ``norm.pre_attn``, ...; not fused slices such as GPT-2's
                  ``attn.q``)
``L5.attn.head2`` head 2's slice of the **input** of the declared head-output module (the per-head
                  output before ``o_proj`` mixes the heads: head_dim channels ``[2*hd, 3*hd)``)
``L5.mlp.neuron7`` channel 7 of the input of the declared neuron-activation module (the MLP down
                  projection: the neuron's activation)
``embed``         the input of block 0 (token embeddings, plus positions / scaling where the family
                  adds them before the first block)
================  ==================================================================================

Heads and neurons are patched *upstream* of the receiver's output projection, so their scores
measure what the changed activation does when read out by the base's own ``o_proj`` / ``down``
weights; a change that lives in those weights is invisible to activation patching (it is what
Weight Patching measures). By default every token position is patched (``positions="all"``);
``positions="last"`` patches the last prompt token only.

Efficiency: the specialized model's activations are cached once per prompt batch (one forward),
the base's block inputs once per batch; components of the same layer are then scored together by
stacking variants of the batch (variant ``v`` overwrites component ``v``'s site) and running only
blocks ``layer..anchor``. Components above the anchor layer cannot move it and score exactly 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch

from weightpatch.components import Component, ComponentSpace, Kind, Site
from weightpatch.engine import EffectStrategy, readout_variants, run_blocks
from weightpatch.errors import ComponentError
from weightpatch.pair import ModelPair, Role
from weightpatch.results import ScoreTable
from weightpatch.runner import Batch, first_tensor, run_segment
from weightpatch.scoring import Effect, GapScorer

METHOD = "activation"
Positions = Literal["all", "last"]


def site_of(space: ComponentSpace, component: Component | str) -> Site:
    """The activation site of a component, as the architecture declares it
    (:meth:`ComponentSpace.site`); raises :class:`ComponentError` for components without one."""
    return space.site(component)


def site_layer(space: ComponentSpace, component: Component) -> int:
    """The first block whose computation the site belongs to (``embed``: 0)."""
    return 0 if component.layer is None else component.layer


def _read_pre(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _hooks(model: torch.nn.Module, keys: Iterable[tuple[str, str]], pre_fn, post_fn) -> Iterator[None]:
    handles = []
    try:
        for module, hook in keys:
            sub = model.get_submodule(module)
            if hook == "pre":
                handles.append(sub.register_forward_pre_hook(pre_fn(module), with_kwargs=True))
            else:
                handles.append(sub.register_forward_hook(post_fn(module)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capturing(model: torch.nn.Module, sites: Iterable[Site], store: dict[tuple[str, str], torch.Tensor]):
    """Record the full tensor at each site's (module, hook) into ``store`` during the block."""
    keys = list(dict.fromkeys(s.key for s in sites))

    def pre_fn(module):
        def hook(_m, args, kwargs):
            store[(module, "pre")] = _read_pre(args, kwargs)

        return hook

    def post_fn(module):
        def hook(_m, _args, output):
            store[(module, "post")] = first_tensor(output)

        return hook

    with _hooks(model, keys, pre_fn, post_fn):
        yield store


def collect(
    model: torch.nn.Module, space: ComponentSpace, batch: Batch, components: Iterable[Component | str], stop: int
) -> dict[tuple[str, str], torch.Tensor]:
    """Run ``model`` on ``batch`` up to block ``stop`` and return the tensors at the sites of
    ``components`` (keyed by ``Site.key``). Sites above ``stop`` are not recorded."""
    sites = [site_of(space, c) for c in components]
    store: dict[tuple[str, str], torch.Tensor] = {}
    with capturing(model, sites, store):
        run_segment(model, space, batch, stop=stop)
    return {k: v.detach() for k, v in store.items()}


@contextmanager
def activation_patched(
    model: torch.nn.Module,
    space: ComponentSpace,
    cache: dict[tuple[str, str], torch.Tensor],
    variants: Sequence[Sequence[Component | str]],
    positions: Positions = "all",
) -> Iterator[None]:
    """Overwrite component outputs with cached values while the block runs.

    The model must be run on the cached batch stacked ``len(variants)`` times (variant-major, as
    :meth:`Batch.repeat` does); rows of variant ``v`` get the sites of ``variants[v]`` overwritten
    with ``cache`` (from :func:`collect` on the same batch). With one variant this is plain
    activation patching of a set of components.
    """
    n_var = len(variants)
    masks: dict[tuple[str, str], torch.Tensor] = {}
    for v, group in enumerate(variants):
        for c in group:
            site = site_of(space, c)
            if site.key not in cache:
                raise ComponentError(f"no cached activation for {space.validate(c).name} (site {site.key})")
            if cache[site.key].dim() != 3:
                raise ComponentError(
                    f"{space.validate(c).name} cannot be activation-patched: its site {site.module} is an observation "
                    f"of shape {tuple(cache[site.key].shape)}, not (batch, seq, channels) (router logits: the block "
                    f"routes with values computed inside the router); patch the whole MLP instead"
                )
            width = cache[site.key].shape[-1]
            mask = masks.setdefault(site.key, torch.zeros(n_var, width, dtype=torch.bool))
            mask[v, site.start or 0 : width if site.stop is None else site.stop] = True

    def overwrite(module: str, hook: str, x: torch.Tensor) -> torch.Tensor:
        src = cache[(module, hook)].to(x.dtype)
        if x.shape[1] == 1 < src.shape[1]:  # inside an anchor block cut to its last position
            src = src[:, -1:]
        b, s = src.shape[0], src.shape[1]
        mask = masks[(module, hook)].to(x.device)[:, None, None, :]
        if positions == "last":
            pos = torch.zeros(s, dtype=torch.bool, device=x.device)
            pos[-1] = True
            mask = mask & pos[None, None, :, None]
        mixed = torch.where(mask, src[None], x.reshape(n_var, b, s, -1))
        return mixed.reshape(x.shape)

    def pre_fn(module):
        def hook(_m, args, kwargs):
            if args:
                return (overwrite(module, "pre", args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": overwrite(module, "pre", kwargs["hidden_states"])}

        return hook

    def post_fn(module):
        def hook(_m, _args, output):
            if isinstance(output, tuple):
                return (overwrite(module, "post", output[0]), *output[1:])
            return overwrite(module, "post", output)

        return hook

    with _hooks(model, masks, pre_fn, post_fn):
        yield


def default_components(
    space: ComponentSpace,
    kinds: Iterable[Kind] = ("layer", "module", "head", "neuron"),
    modules: Sequence[str] = ("attn", "mlp"),
    layers: Iterable[int] | None = None,
) -> list[Component]:
    """Components with an activation site: per layer the block, its ``modules``, heads, neurons."""
    out = []
    for c in space.components(kinds=kinds, layers=range(space.num_layers) if layers is None else layers):
        if c.kind == "module" and c.module not in modules:
            continue
        out.append(c)
    return out


class ActivationScreen(EffectStrategy[Component]):
    """Activation-patching scores on one scorer's prompts and anchor (method ``"activation"``): the
    activation strategy of the sweep, variants grouped by the block their site belongs to.

    The specialized model's activations at the sites requested are cached on first use (one
    forward per batch up to the anchor layer), the base's block inputs on construction (the
    scorer's shared cache).
    """

    method = METHOD

    def __init__(self, scorer: GapScorer, variants_per_batch: int = 16, positions: Positions = "all") -> None:
        super().__init__(scorer)
        self.scorer, self.variants_per_batch, self.positions = scorer, variants_per_batch, positions
        self.pair = scorer.pair
        self.donor_role: Role = "specialized" if self.pair.receiver == "base" else "base"
        scorer.block_inputs()  # cached now, with the receiver's own weights in place
        self._cache: list[dict[tuple[str, str], torch.Tensor]] = [{} for _ in scorer.batches]

    def first_layer(self, item: Component) -> int:
        return site_layer(self.space, item)

    def validate(self, item: Component | str) -> Component:
        """The component, refused early when it has no activation site."""
        component = self.space.validate(item)
        site_of(self.space, component)
        return component

    def _ensure_cached(self, components: Sequence[Component]) -> None:
        missing = {site_of(self.space, c).key for c in components} - set(self._cache[0])
        if not missing:
            return
        sites = [Site(m, h) for m, h in missing]
        with torch.no_grad(), self.pair.as_model(self.donor_role, streamed=True) as donor_model:
            for i, b in enumerate(self.scorer.batches):
                store: dict[tuple[str, str], torch.Tensor] = {}
                with capturing(donor_model, sites, store):
                    run_segment(donor_model, self.space, b, stop=self.scorer.stop)
                self._cache[i].update({k: v.detach().clone() for k, v in store.items()})

    def anchor_scores(self, variants: Sequence[Sequence[Component]], start: int) -> torch.Tensor:
        """Anchor scores (variant, prompt) with each variant's components activation-patched,
        running blocks ``start..anchor`` from the cached base inputs."""
        self._ensure_cached([c for g in variants for c in g])
        outs = []
        for i in range(len(self.scorer.batches)):
            with activation_patched(self.model, self.space, self._cache[i], variants, self.positions):
                outs.append(run_blocks(self.scorer, i, start, variants=len(variants)))
        return readout_variants(self.scorer, outs, len(variants))

    def values(self, group: Sequence[Component], layer: int) -> torch.Tensor:
        return self.anchor_scores([[c] for c in group], layer)

    def effect_of(self, components: Sequence[Component | str]) -> Effect:
        """The normalized effect of activation-patching several components at once."""
        todo = [self.space.validate(c) for c in components]
        todo = [c for c in todo if site_layer(self.space, c) <= self.scorer.stop]
        if not todo:
            return self.scorer.effect(self.scorer.f_receiver)
        start = min(site_layer(self.space, c) for c in todo)
        with torch.no_grad():
            return self.scorer.effect(self.anchor_scores([todo], start)[0])

    def run(self, components: Iterable[Component | str] | None = None, progress: bool = False) -> ScoreTable:
        """Score each component alone (default: :func:`default_components`)."""
        return self.score(default_components(self.space) if components is None else components, progress=progress)


def activation_scores(
    scorer: GapScorer,
    components: Iterable[Component | str] | None = None,
    positions: Positions = "all",
    variants_per_batch: int = 16,
    progress: bool = False,
) -> ScoreTable:
    """Activation-patching scores (method ``"activation"``) of ``components`` (default: every
    block, attention and MLP module, head and neuron), normalized like ``E_w``."""
    return ActivationScreen(scorer, variants_per_batch, positions).run(components, progress=progress)


def patched_residual(
    pair: ModelPair,
    batch: Batch,
    components: Sequence[Component | str],
    layer: int,
    positions: Positions = "all",
) -> torch.Tensor:
    """The receiver's residual stream after block ``layer`` with ``components`` activation-patched
    from the donor model's run on the same batch (all at once)."""
    donor_role: Role = "specialized" if pair.receiver == "base" else "base"
    top = max([layer, *(site_layer(pair.space, pair.space.validate(c)) for c in components)])
    with torch.no_grad():
        with pair.as_model(donor_role, streamed=True) as donor_model:
            cache = collect(donor_model, pair.space, batch, components, stop=top)
            cache = {k: v.clone() for k, v in cache.items()}
        with activation_patched(pair.model, pair.space, cache, [list(components)], positions):
            return run_segment(pair.model, pair.space, batch, stop=layer)[0]


__all__ = [
    "METHOD",
    "ActivationScreen",
    "Site",
    "activation_patched",
    "activation_scores",
    "capturing",
    "collect",
    "default_components",
    "patched_residual",
    "site_of",
]
