"""Long sequences: decoder layers whose per-token work runs in chunks of the sequence.

    tiled_decoder.enable(model)          # Llama decoder layers and the final norm, chunks of chunk_tokens(config)
    tiled_decoder.enable(model, 1024)    # an explicit chunk

A Llama layer is attention (mixes tokens) between two blocks that act on each token alone:

    before:  RMSNorm, q / k / v projections, RoPE          x -> q, k, v
    after:   o projection, residual, RMSNorm, MLP, residual   x, attention output -> layer output

Each block runs as one autograd Function over chunks of the sequence (`_Tiled`): forward keeps only
the block's inputs (x: 2 B x hidden per token, the attention output: the same), and backward
recomputes the block one chunk at a time. So the MLP's [tokens, intermediate] tensors (28 KiB per
token each at Llama-3-8B), the norms' fp32 upcasts (16 KiB per token each) and RoPE's temporaries
exist for one chunk, never for the sequence, in forward, in the checkpoint's recompute and in
backward. What stays linear in tokens inside a layer is what attention itself needs (q, k, v, its
output: 20 KiB per token at Llama-3-8B) plus the blocks' inputs and gradients. Attention runs
through the model's own attention function (SDPA / flash: nothing quadratic).

Weight gradients. Backward takes each chunk's gradients with `torch.autograd.grad` (which
accumulates nothing into `.grad` and fires no hook) and sums them per parameter (in fp32 for
16-bit parameters: one rounding, as one matmul over all tokens makes); the Function returns the
sums as the parameters' gradients, so AccumulateGrad and the post-accumulate-grad hooks of SIFT run
once per micro-batch with the whole micro-batch's gradient, as without tiling. (DeepSpeed's
TiledMLP calls `torch.autograd.backward` per chunk instead: every hook fires once per chunk, so
SIFT would select from one chunk's gradient and its in-backward step would refuse the second.)
The price: these sums are dense, alive together during the block's backward: nothing for QSIFT
(its trained parameter is the k-entry delta) or LoRA, 4 B per weight entry of the block for SIFT on
bf16 weights (0.75 GiB for a Llama-3-8B layer's o / gate / up / down).

QSIFT's "grad" selection reads the dense dW of the first micro-batch inside `_QSIFTMatmul`'s
backward; per chunk it would read one chunk's. So in the first backward, before the chunk loop, each
not yet selected QSIFTLinear of the block gets its whole-micro-batch dW summed over the chunks in
fp32 (`_Probe`, one layer at a time: one dense fp32 weight-sized sum alive), rounded to the
gradient's dtype as the untiled dW is, and selects from it (`sift.selection.choose`, as `sparse_grad` does). That costs one more
pass over the block per such layer, in the first backward only.

Cost in time: the block after attention (o projection and MLP: 88 % of a Llama-3-8B layer's weights)
computes nothing in the checkpoint's recompute, whose output nobody reads, and runs again chunk by
chunk in its backward, so its forward still runs twice per step; the block before attention runs
three times (the recompute must make q, k, v for attention). Against the untiled checkpointed
layer that is +3 % of a layer's matmul work at Llama-3-8B shapes (forward 1, recompute 0.12,
backward's recompute 1, backward 2: 4.12 units against 4), plus what smaller matmuls and one
QSIFT dequantization per chunk cost. Tiling applies only in a grad-enabled
forward of a sequence longer than one chunk with no KV cache; otherwise the layer runs its own code
(so short sequences, evaluation and generation move no bit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama

from sift.qlinear import QSIFTLinear
from sift.selection import choose

# Sizing of a chunk: one [chunk, intermediate] tensor of the MLP in 2-byte activations takes at most
# this many bytes. A chunk's transients in the MLP's backward are ~10 such tensors (gate, up, their
# activation, product and gradients), so 64 MiB bounds them near 0.6 GiB: at Llama-3-8B a chunk of
# 2,304 tokens (matmuls of 2,304 x 4,096 x 14,336 keep a GPU busy); the 135 M demo model tiles
# nothing below 21,760 tokens.
CHUNK_BYTES = 64 * 2**20
CHUNK_MULTIPLE = 128
ATTR = "tile_tokens"  # on each tiled module: its chunk in tokens
PLAN_EVERY_CHUNK = False  # tests: run every chunk on the meta device too (see _Block.pieces)


def chunk_tokens(config, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk for `config`: the MLP's intermediate of one chunk within `chunk_bytes`."""
    tokens = chunk_bytes // (2 * config.intermediate_size)
    return max(CHUNK_MULTIPLE, tokens // CHUNK_MULTIPLE * CHUNK_MULTIPLE)


class _Block:
    """One per-token block of a layer for `_Tiled`: fn(*chunk inputs) -> tuple of chunk outputs, its
    modules' trained parameters, and the chunk length. Every input and output has the sequence on dim 1."""

    def __init__(self, fn, modules, chunk: int, discard: bool = False):
        self.fn, self.chunk = fn, chunk
        self.modules = modules
        self.discard = discard  # forward returns one uninitialised tensor like the first input
        self.params = list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values())

    def pieces(self, inputs):
        """(start, [each input narrowed to the chunk]) over the sequence. On the meta device (the
        memory planner) only the first, second and last chunks: the chunks between allocate and free
        exactly what the second does (same shapes, the sums already made), so the peak is the same."""
        length = inputs[0].shape[1]
        starts = range(0, length, self.chunk)
        if inputs[0].is_meta and not PLAN_EVERY_CHUNK:
            starts = sorted({*starts[:2], starts[-1]})
        for start in starts:
            size = min(self.chunk, length - start)
            yield start, [t.narrow(1, start, size) for t in inputs]

    def unselected(self) -> list[QSIFTLinear]:
        """QSIFT layers of the block waiting for their "grad" selection."""
        return [m for mod in self.modules for m in mod.modules()
                if isinstance(m, QSIFTLinear) and m.delta is not None and m.delta.requires_grad and not m.ready()]

    def run(self, *inputs):
        """The block over the whole sequence, tiled when it spans more than one chunk."""
        if inputs[0].shape[1] <= self.chunk:
            return self.fn(*inputs)
        return _Tiled.apply(self, len(inputs), *inputs, *self.params)


class _Tiled(torch.autograd.Function):
    """Outputs of `block.fn` chunk by chunk; saves only the inputs; backward recomputes each chunk and
    returns each parameter's gradient summed over the chunks (see the module doc)."""

    @staticmethod
    def forward(ctx, block: _Block, n: int, *args):
        inputs = args[:n]
        ctx.block, ctx.n = block, n
        ctx.save_for_backward(*inputs)
        if block.discard:
            return (torch.empty_like(inputs[0]),)
        outs = None
        for start, pieces in block.pieces(inputs):
            ys = block.fn(*pieces)
            if outs is None:  # written in place: no list of chunk outputs and no concatenation copy
                outs = [y.new_empty((*y.shape[:1], inputs[0].shape[1], *y.shape[2:])) for y in ys]
            for out, y in zip(outs, ys):
                out.narrow(1, start, y.shape[1]).copy_(y)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        block, n, inputs = ctx.block, ctx.n, ctx.saved_tensors
        need_in = ctx.needs_input_grad[2:2 + n]
        need_p = ctx.needs_input_grad[2 + n:]
        params = [p for p, need in zip(block.params, need_p) if need]
        for layer in block.unselected():
            _select_whole(block, layer, inputs, grads)
        dins = [torch.empty_like(t) if need else None for t, need in zip(inputs, need_in)]
        sums = [None] * len(params)
        for start, pieces in block.pieces(inputs):
            pieces = [p.detach().requires_grad_(need) for p, need in zip(pieces, need_in)]
            with torch.enable_grad():
                ys = block.fn(*pieces)
            ys, gys = _differentiable(ys, grads, start)
            wrt = [p for p, need in zip(pieces, need_in) if need] + params
            gs = list(torch.autograd.grad(ys, wrt, gys, allow_unused=True)) if ys else [None] * len(wrt)
            for din in (d for d in dins if d is not None):
                g = gs.pop(0)
                chunk = din.narrow(1, start, pieces[0].shape[1])
                chunk.zero_() if g is None else chunk.copy_(g)
            for i, g in enumerate(gs):
                sums[i] = _add(sums[i], g, params[i])
        out = iter(_as_param_grads(sums, params))
        return (None, None, *dins, *(next(out) if need else None for need in need_p))


def _differentiable(ys, grads, start):
    """The chunk outputs that carry a gradient, with their slices of the output gradients."""
    pairs = [(y, g.narrow(1, start, y.shape[1])) for y, g in zip(ys, grads) if y.requires_grad]
    return [y for y, _ in pairs], [g for _, g in pairs]


def _sum_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


def _add(total, g, p):
    if g is None:
        return total
    if total is None:  # a copy: autograd may hand back a tensor it also uses elsewhere
        return g.to(_sum_dtype(p), copy=True)
    return total.add_(g)


def _as_param_grads(sums, params):
    """Each sum in its parameter's dtype (zeros for an unused one), cast one at a time."""
    for i, p in enumerate(params):
        s = sums[i]
        sums[i] = None  # the fp32 sum dies as its cast is made
        yield torch.zeros_like(p) if s is None else s.to(p.dtype)


class _Probe(torch.autograd.Function):
    """A QSIFTLinear as the plain linear map it computes (deq(Q) + delta at its indices), its weight
    gradient summed into `total` (fp32) when given; `token` makes the summing layer's output carry a
    gradient when nothing before it does. No selection happens here."""

    @staticmethod
    def forward(ctx, x, token, layer: QSIFTLinear, total):
        ctx.layer, ctx.total = layer, total
        ctx.save_for_backward(x)
        return F.linear(x, layer.effective_weight())

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        if ctx.total is not None:
            ctx.total.addmm_(gy.reshape(-1, gy.shape[-1]).t().float(), x.reshape(-1, x.shape[-1]).float())
        dx = gy @ ctx.layer.effective_weight() if ctx.needs_input_grad[0] else None
        dtoken = torch.zeros((), device=gy.device) if ctx.needs_input_grad[1] else None
        return dx, dtoken, None, None


def _select_whole(block: _Block, layer: QSIFTLinear, inputs, grads):
    """`layer`'s "grad" selection from the dW of the whole micro-batch: the block is run again chunk by
    chunk with every QSIFT layer of it as a `_Probe`, `layer`'s summing its dW in fp32."""
    total = torch.zeros(layer.shape, dtype=torch.float32, device=inputs[0].device)
    token = torch.zeros((), device=inputs[0].device, requires_grad=True)
    probes = [m for mod in block.modules for m in mod.modules() if isinstance(m, QSIFTLinear)]
    try:
        for m in probes:
            m.forward = _probe_forward(m, token if m is layer else None, total if m is layer else None)
        for start, pieces in block.pieces(inputs):
            with torch.enable_grad():
                ys = block.fn(*(p.detach() for p in pieces))
            ys, gys = _differentiable(ys, grads, start)
            if ys:
                torch.autograd.grad(ys, [token], gys, allow_unused=True)
    finally:
        for m in probes:
            del m.forward  # back to the class's forward
    dw = total.to(grads[0].dtype)  # rounded as the untiled dW is, before its top-k
    del total
    layer.select(choose(layer.selection, layer.k, layer.numel, grad=dw))


def _probe_forward(layer: QSIFTLinear, token, total):
    def forward(x):
        y = _Probe.apply(x, token, layer, total)
        return y if layer.bias is None else y + layer.bias

    return forward


# ---------------------------------------------------------------------------- the Llama blocks
def _before_attention(layer, x, cos, sin):
    """RMSNorm, q / k / v, RoPE; outputs [batch, tokens, heads, head_dim] (attention takes them transposed)."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q, k = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
    q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    return q, k, attn.v_proj(h).view(shape)


def _after_attention(layer, x, attn_out):
    """o projection and residual, RMSNorm, MLP and residual."""
    h = x + layer.self_attn.o_proj(attn_out)
    return (h + layer.mlp(layer.post_attention_layernorm(h)),)


def _layer_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                   use_cache=False, position_embeddings=None, **kwargs):
    """LlamaDecoderLayer.forward with its two per-token blocks tiled (the same arithmetic per token)."""
    chunk = getattr(self, ATTR)
    if not torch.is_grad_enabled() or past_key_values is not None or hidden_states.shape[1] <= chunk:
        return type(self).__mro__[1].forward(self, hidden_states, attention_mask=attention_mask,
                                             position_ids=position_ids, past_key_values=past_key_values,
                                             use_cache=use_cache, position_embeddings=position_embeddings,
                                             **kwargs)
    attn = self.self_attn
    cos, sin = position_embeddings
    before = _Block(lambda x, c, s: _before_attention(self, x, c, s),
                    [self.input_layernorm, attn.q_proj, attn.k_proj, attn.v_proj], chunk)
    q, k, v = before.run(hidden_states, cos, sin)
    interface = modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                                     modeling_llama.eager_attention_forward)
    out, _ = interface(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                       dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling,
                       **kwargs)
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
    # In the checkpoint's recompute (inside backward) the layer's output is never read: the
    # non-reentrant checkpoint drops it, the reentrant one only backpropagates through its graph. The
    # block then saves its inputs and computes nothing; its backward recomputes it chunk by chunk.
    recompute = self.gradient_checkpointing and torch._C._current_graph_task_id() != -1
    after = _Block(lambda x, a: _after_attention(self, x, a),
                   [attn.o_proj, self.post_attention_layernorm, self.mlp], chunk, discard=recompute)
    return after.run(hidden_states, out)[0]


def _norm_forward(self, hidden_states):
    """The final RMSNorm, tiled: its fp32 upcast exists for one chunk at a time."""
    chunk = getattr(self, ATTR)
    base = type(self).__mro__[1].forward
    if not torch.is_grad_enabled() or hidden_states.shape[1] <= chunk:
        return base(self, hidden_states)
    return _Block(lambda x: (base(self, x),), [self], chunk).run(hidden_states)[0]


# ---------------------------------------------------------------------------- switching it on
_CLASSES: dict[type, type] = {}


def _tiled_class(cls: type, forward) -> type:
    """A subclass of `cls` with `forward` (made once per class); transformers' checkpointing wrapper,
    set on subclasses too, still checkpoints it."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Tiled{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _CLASSES[cls]


def _problems(decoder) -> list[str]:
    problems = []
    if decoder.config.model_type != "llama":
        problems.append(f"model_type {decoder.config.model_type!r}: tiled layers follow Llama's layer")
    if any(hasattr(p, "ds_tensor") for p in decoder.parameters()):
        problems.append("DeepSpeed ZeRO-3 partitioned parameters: the chunked backward gathers nothing")
    for layer in decoder.layers:
        drop = [m for m in layer.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if drop:  # the chunks' recompute in backward would draw other masks
            problems.append(f"dropout p={drop[0].p} inside a decoder layer: tiling recomputes without its masks")
            break
    return problems


def flag_problems(args, config, zero3: bool) -> list[str]:
    """train_sft.py's --tile_tokens against the model's config and the other options, one line each,
    before any weight loads: what `enable` would refuse on the loaded model."""
    flag = f"--tile_tokens {args.train.tile_tokens}"
    if args.train.tile_tokens < 1:  # off, or refused by its own range check
        return []
    out = []
    if config is not None and config.model_type != "llama":
        out.append(f"{flag}: the model's model_type is {config.model_type!r}; tiled layers follow Llama's layer")
    if zero3:
        out.append(f"{flag}: not with DeepSpeed ZeRO-3 (its partitioned weights are gathered per module call; the "
                   "chunked backward gathers nothing)")
    if args.method.finetuning_type == "lora" and args.method.lora_dropout > 0:
        out.append(f"{flag}: not with --lora_dropout {args.method.lora_dropout} (the chunks' recompute in backward "
                   "would draw other dropout masks)")
    return out


def enable(model, chunk: int | None = None) -> int:
    """Tile every decoder layer and the final norm of a loaded (HF or PEFT-wrapped) Llama model in
    chunks of `chunk` tokens (default: `chunk_tokens(config)`); returns the chunk. Call it after
    activation checkpointing is enabled (it then drops transformers' input-require-grads hook, see
    below). ValueError names what does not fit. Idempotent; `disable` restores the model's own classes."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = lm.model
    problems = _problems(decoder)
    if problems:
        raise ValueError("tiled layers: " + "; ".join(problems))
    chunk = chunk or chunk_tokens(decoder.config)
    if chunk < 1:
        raise ValueError(f"tiled layers: chunk {chunk}: must be >= 1 token")
    for module, forward in [(layer, _layer_forward) for layer in decoder.layers] + [(decoder.norm, _norm_forward)]:
        if type(module) not in _CLASSES.values():
            module.__class__ = _tiled_class(type(module), forward)
        setattr(module, ATTR, chunk)
    if _non_reentrant(decoder):
        # transformers makes the (frozen) embedding output a leaf that requires grad, for reentrant
        # checkpointing; non-reentrant checkpointing does not need it, and the leaf would stay on the
        # device through backward and get a [tokens, hidden] gradient (2 x 2 B x hidden per token)
        lm.disable_input_require_grads()
    return chunk


def _non_reentrant(decoder) -> bool:
    func = getattr(decoder.layers[0], "_gradient_checkpointing_func", None)
    return func is None or getattr(func, "keywords", {}).get("use_reentrant") is False


def disable(model) -> None:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in list(lm.model.layers) + [lm.model.norm]:
        if type(module) in _CLASSES.values():
            module.__class__ = type(module).__mro__[1]
            delattr(module, ATTR)


def enabled(model) -> int | None:
    """The chunk of a tiled model, or None."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(lm.model.norm, ATTR, None)
