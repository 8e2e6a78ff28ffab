"""Pretraining objectives (clm | mlm) and the CLM loss that never holds a micro-batch's logits.

Both avoid the output layer's full cost where no loss is taken: MLM runs the vocabulary
projection on the masked positions only; CLM takes the loss in chunks of rows inside one
autograd function (`FusedLinearCrossEntropy`), where the engine keeps whole weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.spec import RunSpec


class Objective:
    """Loss of one micro-batch of packed sequences (seq_len + 1 tokens each)."""

    def __init__(self, spec: RunSpec, tokenizer, vocab_size: int) -> None:
        self.kind = spec.objective.type
        self.mask_prob = spec.objective.mask_prob
        self.seed = spec.training.seed
        self.vocab_size = vocab_size
        if self.kind == "mlm":
            if tokenizer.mask_token_id is None:
                raise UserError(
                    "the tokenizer has no mask token", field="objective.type", expected="clm for it"
                )
            self.mask_id = tokenizer.mask_token_id
            self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.document_mask = bool(spec.data is not None and spec.data.document_mask)
        self.attention: str | None = None  # the model's attention implementation (attach)
        self.keep: torch.Tensor | None = None  # mlm: the positions the output layer runs on
        self.targets: torch.Tensor | None = None  # clm: next tokens, for the loss in chunks

    def attach(self, model, whole_weights: bool = True) -> None:
        """MLM: run the vocabulary projection only where a loss is taken. Only the masked ~15%
        of positions carry loss, and the projection (vocab x hidden) costs as much as a small
        encoder: a pre-hook on the model's output layer selects those rows of its input, so the
        model (through DDP or DeepSpeed, whose hooks stay in place) returns their logits only.
        CLM: the output layer takes the loss in chunks (`chunked_loss_head`) where the engine
        keeps whole weights on every rank (not ZeRO-3, whose partitioned weights would be gone
        when the backward recomputes a chunk)."""
        self.attention = getattr(model.config, "_attn_implementation", None)
        if self.document_mask and self.kind == "mlm" and self.attention not in ("sdpa", "eager"):
            raise UserError(f"a document mask for mlm needs sdpa or eager attention, not {self.attention}",
                            field="data.document_mask", expected="false for this model")
        head = model.get_output_embeddings()
        if self.kind == "mlm" and head is not None:
            head.register_forward_pre_hook(self._select_masked)
        if self.kind == "clm" and isinstance(head, torch.nn.Linear) and whole_weights:
            chunked_loss_head(head, self)

    def _select_masked(self, _module, args):
        if self.keep is None:
            return None
        return (args[0][self.keep], *args[1:])

    def __call__(self, module, batch: dict, device) -> torch.Tensor:
        tokens = batch["tokens"].to(device)
        docs = None
        if self.document_mask:
            docs = DocumentLayout.of(batch["doc_starts"], tokens.shape[1] - 1)
        if self.kind == "clm":
            targets = tokens[:, 1:] if docs is None else docs.within(tokens[:, 1:])
            self.targets = targets
            # position ids that restart: transformers masks each document (varlen with flash
            # attention) where no KV cache is built
            extra = {} if docs is None else {"position_ids": docs.positions.to(device), "use_cache": False}
            try:
                out = module(input_ids=tokens[:, :-1], **extra).logits
            finally:
                self.targets = None
            if out.dim() == 0:  # the output layer took the loss itself, in chunks
                return out
            return F.cross_entropy(out.float().reshape(-1, out.size(-1)), targets.reshape(-1))
        inputs, labels = self.mask(tokens[:, :-1].cpu(), batch["positions"])
        labels = labels.to(device)
        keep = labels != -100
        self.keep = keep
        extra = {}
        if docs is not None:
            extra = {"position_ids": docs.positions.to(device),
                     "attention_mask": docs.bidirectional_mask(self.attention).to(device)}
        try:
            logits = module(input_ids=inputs.to(device), **extra).logits
        finally:
            self.keep = None
        if logits.dim() == 3:  # a model whose output layer the hook could not reach: all positions
            logits = logits[keep]
        if not bool(keep.any()):  # nothing masked in this micro-batch: contribute zero
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), labels[keep])

    def mask(
        self, inputs: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking (80% [MASK], 10% random, 10% kept), seeded per global sample position
        so the same sample gets the same mask whatever the world size or resume point."""
        inputs, labels = inputs.clone(), inputs.clone()
        for row, pos in enumerate(positions.tolist()):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + pos)
            p, r = (
                torch.rand(inputs.shape[1], generator=g),
                torch.rand(inputs.shape[1], generator=g),
            )
            rand_tok = torch.randint(self.vocab_size, (inputs.shape[1],), generator=g)
            masked = (p < self.mask_prob) & ~torch.isin(inputs[row], self.special)
            labels[row, ~masked] = -100
            inputs[row, masked & (r < 0.8)] = self.mask_id
            swap = masked & (r >= 0.8) & (r < 0.9)
            inputs[row, swap] = rand_tok[swap]
        return inputs, labels


class DocumentLayout:
    """Where the documents of a micro-batch of packed samples begin: position ids that restart
    at each document, the document of every position, and what that means for attention and
    targets (`data.document_mask`)."""

    def __init__(self, segments: torch.Tensor, positions: torch.Tensor, starts: list[torch.Tensor]) -> None:
        self.segments, self.positions, self.starts = segments, positions, starts

    @classmethod
    def of(cls, doc_starts: list[torch.Tensor], n: int) -> DocumentLayout:
        """`doc_starts`: per sample, the offsets (0 .. n) at which a document begins, of a sample
        whose first `n` tokens are the input."""
        b = len(doc_starts)
        begins = torch.zeros(b, n, dtype=torch.bool)
        for row, starts in enumerate(doc_starts):
            inside = starts[(starts > 0) & (starts < n)]
            begins[row, inside.long()] = True
        index = torch.arange(n).expand(b, n)
        first = torch.where(begins, index, torch.zeros_like(index)).cummax(dim=1).values
        return cls(begins.long().cumsum(dim=1), index - first, [s.long() for s in doc_starts])

    def within(self, targets: torch.Tensor) -> torch.Tensor:
        """Next-token targets without those across a boundary: the token at offset k that begins
        a document is not predicted from the one before it (ignored, -100)."""
        out = targets.clone()
        n = targets.shape[1]
        for row, starts in enumerate(self.starts):
            s = starts[(starts >= 1) & (starts <= n)]
            out[row, s - 1] = -100
        return out

    def bidirectional_mask(self, attention: str | None) -> torch.Tensor:
        """(b, 1, n, n): every token attends to every token of its own document, in the form the
        attention implementation takes (sdpa: True where allowed; eager: 0 or the dtype's min)."""
        same = (self.segments[:, :, None] == self.segments[:, None, :])[:, None]
        if attention == "eager":
            return torch.zeros(same.shape).masked_fill_(~same, torch.finfo(torch.float32).min)
        return same


CHUNK_LOGITS = 1 << 25  # fp32 logits per chunk of the clm loss (128 MiB)


def chunked_loss_head(head: torch.nn.Linear, objective: Objective) -> None:
    """CLM without the micro-batch's whole logits: while the objective holds targets, the output
    layer returns the mean next-token loss instead of logits (`FusedLinearCrossEntropy`), so peak
    memory holds one chunk's logits (CHUNK_LOGITS elements), not tokens x vocabulary. One chunk
    (small vocabularies, short micro-batches): the plain loss, as before. Its state_dict is
    unchanged (the instance's forward is replaced, not the module); evaluation and export see
    plain logits when no targets are set."""
    plain = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        targets = objective.targets
        if targets is None:
            return plain(hidden)
        h, t = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
        rows = max(1, CHUNK_LOGITS // head.out_features)
        if h.size(0) <= rows:
            return F.cross_entropy(plain(h).float(), t)
        return FusedLinearCrossEntropy.apply(h, head.weight, head.bias, t, rows, torch.is_grad_enabled())

    head.forward = forward


class FusedLinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i W^T + b, t_i) over chunks of rows, with its gradients computed in the
    forward, chunk by chunk, from each chunk's softmax: no logits are kept for the backward and
    none recomputed (the same three matmuls as forward + backward of the plain loss). Under
    no_grad (evaluation) `with_grads` is False: the same loss, one matmul per chunk."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, rows, with_grads):
        counted = targets != -100  # targets across a document boundary are ignored, as F.cross_entropy does
        n = int(counted.sum())
        grad_h = torch.empty_like(h) if with_grads else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if with_grads and weight.requires_grad else None
        grad_b = (torch.zeros_like(bias, dtype=torch.float32)
                  if with_grads and bias is not None and bias.requires_grad else None)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        all_counted = n == h.size(0)
        for i in range(0, h.size(0), rows):
            hc, tc, kc = h[i:i + rows], targets[i:i + rows].clamp_min(0), counted[i:i + rows]
            logits = F.linear(hc, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            per_row = lse - logits.gather(1, tc[:, None]).squeeze(1)
            total += (per_row if all_counted else per_row * kc).sum()
            if not with_grads:
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(g.size(0), device=g.device), tc] -= 1.0
            if not all_counted:
                g.mul_(kc[:, None])
            g = g.div_(max(n, 1)).to(hc.dtype)  # d(mean loss)/d logits
            grad_h[i:i + rows] = g @ weight.to(hc.dtype)
            if grad_w is not None:
                grad_w += g.t() @ hc
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        scale = grad_out.float()
        grad_h = grad_h.mul_(scale.to(grad_h.dtype))
        grad_w = None if grad_w is None else grad_w.mul_(scale).to(ctx.dtypes[0])
        grad_b = None if grad_b is None else grad_b.mul_(scale).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None
