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
        if self.kind == "clm":
            self.targets = tokens[:, 1:]
            try:
                out = module(input_ids=tokens[:, :-1]).logits
            finally:
                self.targets = None
            if out.dim() == 0:  # the output layer took the loss itself, in chunks
                return out
            return F.cross_entropy(out.float().reshape(-1, out.size(-1)), tokens[:, 1:].reshape(-1))
        inputs, labels = self.mask(tokens[:, :-1].cpu(), batch["positions"])
        labels = labels.to(device)
        keep = labels != -100
        self.keep = keep
        try:
            logits = module(input_ids=inputs.to(device)).logits
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
        n = h.size(0)
        grad_h = torch.empty_like(h) if with_grads else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if with_grads and weight.requires_grad else None
        grad_b = (torch.zeros_like(bias, dtype=torch.float32)
                  if with_grads and bias is not None and bias.requires_grad else None)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, n, rows):
            hc, tc = h[i:i + rows], targets[i:i + rows]
            logits = F.linear(hc, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if not with_grads:
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(g.size(0), device=g.device), tc] -= 1.0
            g = g.div_(n).to(hc.dtype)  # d(mean loss)/d logits
            grad_h[i:i + rows] = g @ weight.to(hc.dtype)
            if grad_w is not None:
                grad_w += g.t() @ hc
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        scale = grad_out.float()
        grad_h = grad_h.mul_(scale.to(grad_h.dtype))
        grad_w = None if grad_w is None else grad_w.mul_(scale).to(ctx.dtypes[0])
        grad_b = None if grad_b is None else grad_b.mul_(scale).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None
