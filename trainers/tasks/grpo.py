"""Group relative policy optimisation (`finetune.kind: grpo`): reinforcement learning of a causal
LM (the policy) against rewards, without a value network.

Each micro-batch of prompts, inside the loss:

    sample   group_size completions per prompt from the policy as it is now (KV cache,
             temperature, top_p), each up to max_new_tokens, ending at the end-of-sequence token
    score    every reward: the reward functions (TRL's signature), the reward model (a reward
             stage's export scoring prompt + completion); the total is their weighted sum
    advantage  A = (r - mean of its group) / (std of its group + 1e-4)   (scale_rewards: false
             leaves out the division)
    loss     per completion token: -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)
             + kl_coef (exp(ref - logp) - (ref - logp) - 1)           (the k3 estimator of KL)
             summed over the micro-batch's completion tokens / their count (token), or each
             completion's mean then their mean (sequence)

With num_iterations 1 (TRL's default) one update per generation: the ratio is 1 in value and
carries the gradient of A log pi. With num_iterations N each generation serves N optimizer steps
in a row (the sampler gives the same prompts N times, finetune.py's RepeatedSteps): the first
samples and keeps its completions, advantages and log-probs (the "old" policy's), the next ones
take the ratio to them, clipped. The kept generations are in every checkpoint (each rank's
own). Log-probs, the policy's and the reference's, are of logits / temperature, as TRL's. The
reference is the policy with its adapters off (lora, qlora) or a frozen copy of the initial
model (full), none when kl_coef is 0 (trainers/tasks/reference.py).

Exact resume: a completion's sampling noise is drawn from a generator seeded by the run's seed,
the prompt's position in the run's global order of examples and its place in the group, so the
same step samples the same completions after a restart, whatever happened to the process (the
checkpoint's step and sampler position determine it). Validation uses fixed noise per prompt:
each evaluation samples with the same numbers, so rewards compare across steps.

Logged under TRL's names at each logged step (summed over ranks): reward, reward_std (the mean
of the groups' std), rewards/<name>/mean, kl, completions/mean_length, completions/clipped_ratio
(no end of sequence within max_new_tokens), time/generation_s (per micro-batch, sampling and
scoring); at validation eval_<name>, val/<set>/<name> for named sets, and `samples_logged`
completions with their rewards to samples/step_N.jsonl and the W&B table `samples`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field

import torch

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.finetune import GrpoSpec
from hpctrain.launcher.contract.user_code import load_function
from hpctrain.trainers.data.examples import Tokenized, field_value
from hpctrain.trainers.tasks import KindBase, Start, write_rows
from hpctrain.trainers.tasks.dpo import disable_dropout, keeps_logits
from hpctrain.trainers.tasks.reference import reference_source
from hpctrain.trainers.tasks.reward import scoring_ids
from hpctrain.trainers.tasks.sft import PROMPT_TEMPLATE, chat_prompt_ids


@dataclass
class Prompts(Tokenized):
    """Tokenized prompts (`input_ids`; `labels` unused), with what the reward functions get:
    each prompt as written (a string or chat messages) and the record's other fields."""

    prompts: list = field(default_factory=list)
    fields: list[dict] = field(default_factory=list)


class GRPO(KindBase):
    """The grpo kind's part of a training process (trainers/tasks/__init__.py: `KindTask`)."""

    peft_task_type = "CAUSAL_LM"
    logs_training_metrics = True

    def __init__(self, ft: GrpoSpec) -> None:
        self.ft = ft
        self.names = ft.reward_names()
        self.weights = torch.tensor(ft.weights(), dtype=torch.float64)
        # columns of a completion's statistics: total reward, its group's std, each reward, kl,
        # length, clipped, tokens whose ratio the clip holds; then on a micro-batch's first row
        # only: 1, its generation seconds
        self.counts_size = 1 + 8 + len(self.names)  # completions, then the columns' sums
        self.functions: list = []
        self.reward_model = None  # (frozen sequence classifier, its tokenizer)
        self.reference = None  # scores completion tokens with the reference (kl_coef > 0)
        self.engine = None  # the engine, whose `sampling()` gives the model to sample from (None: the module given)
        self.tok = None
        self.trims = False
        self.sync_sampling = False  # sharded engines: every rank runs as many forwards
        self.seed = 0
        self.samples: list[dict] = []  # an evaluation's first completions, rank 0's
        # num_iterations > 1: the generations of the current cycle of updates, by their draws
        self.buffer: dict[tuple, dict] = {}
        self.cycle = -1
        self.warned_regenerated = False
        self.say = print

    # -- examples --------------------------------------------------------------------------

    def labels(self, records, path: str) -> None:  # noqa: ARG002 - the model's own head
        return None

    def tokenize(self, records, tok, path: str, labels: list[str] | None) -> Prompts:  # noqa: ARG002
        """Each prompt's ids (the SFT prompt template, or the chat template with the assistant's
        turn opened); a longer prompt than seq_len keeps its last tokens (counted)."""
        self.tok = tok
        ids, prompts, fields, cut = [], [], [], 0
        for line, rec in records:
            prompt = field_value(rec, self.ft.prompt_field, path, line, "finetune.prompt_field")
            if isinstance(prompt, list):
                p = chat_prompt_ids(prompt, tok, path, line, "finetune.prompt_field")
            else:
                p = tok(PROMPT_TEMPLATE.format(prompt=prompt), add_special_tokens=False)["input_ids"]
            if len(p) > self.ft.seq_len:
                p, cut = p[-self.ft.seq_len :], cut + 1
            ids.append(p)
            prompts.append(prompt)
            fields.append({k: v for k, v in rec.items() if k != self.ft.prompt_field})
        return Prompts(ids, [[] for _ in ids], cut, prompts, fields)

    def for_training(self, tk: Tokenized) -> Tokenized:
        return tk

    def collate(self, tk: Prompts, idx: list[int], pad_id: int) -> dict:
        """The prompts padded on the left (completions follow them directly), their place in
        the set (`index`), and what the reward functions get."""
        width = max(len(tk.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            row = tk.input_ids[i]
            ids[j, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[j, width - len(row) :] = 1
        return {"input_ids": ids, "attention_mask": mask, "index": list(idx),
                "prompts": [tk.prompts[i] for i in idx], "fields": [tk.fields[i] for i in idx]}

    # -- set-up ----------------------------------------------------------------------------

    def before_steps(self, start: Start) -> str | None:
        """The policy to sample from, the reward functions and model, and the reference."""
        if self.ft.disable_dropout:
            disable_dropout(start.model)
        self.engine = start.engine
        self.trims = keeps_logits(start.model)
        self.sync_sampling = start.run.d.world_size > 1 and not start.engine.capabilities.whole_weights
        self.seed = start.run.spec.training.seed
        self.say = start.run.mon.print
        self._load_rewards(lambda m: start.engine.frozen(m), start.run.mon.print)
        if self.ft.reference_kind() is not None:
            self.reference, _ = reference_source(self.ft, start, self._reference_logps)
        return None

    def use_initial_model(self, build) -> None:
        from hpctrain.trainers.engines import Frozen

        self._load_rewards(Frozen, lambda _: None)
        how = self.ft.reference_kind()
        if how == "adapter":
            self.reference, _ = reference_source(self.ft, None, self._reference_logps)
        elif how == "model":
            frozen = Frozen(build())
            self.reference = lambda module, ids, mask, comp: self._reference_logps(frozen, ids, mask, comp)[0]  # noqa: ARG005

    def _load_rewards(self, hold, say) -> None:
        """Every rank imports the reward functions and holds the reward model (`hold`)."""
        self.functions = []
        for i, name in enumerate(self.ft.reward_functions):
            try:
                self.functions.append(load_function(name))
            except Exception as e:  # noqa: BLE001 - whatever the user's module raised
                raise UserError(f"{name} cannot be imported: {type(e).__name__}: {e}",
                                field=f"finetune.reward_functions.{i}",
                                expected="module:function, the module importable from here or PYTHONPATH") from None
        if self.ft.reward_model:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            path = self.ft.reward_model
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tok.pad_token_id
            self.reward_model = (hold(model), tok)
            say(f"reward model: {path} ({sum(p.numel() for p in model.parameters()):,} parameters), frozen")

    # -- a micro-batch ---------------------------------------------------------------------

    def loss(self, module, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the GRPO loss of the micro-batch's completions, their statistics [rows, columns])."""
        ft = self.ft
        gen = self._generation(module, batch, device)
        batch["work_tokens"] = int(gen["full_mask"].sum())
        logps = self._token_logps(module, gen["full"], gen["full_mask"], gen["comp"])
        if gen["old"] is None:  # sampled just now by this very policy: the ratio is 1 in value
            gen["old"] = logps.detach()
            if self._buffers(batch):
                self.buffer[tuple(batch["draws"])] = gen
        m = gen["comp_mask"].to(logps.dtype)
        ratio = torch.exp(logps - gen["old"])
        a = gen["adv"].to(device=device, dtype=logps.dtype).unsqueeze(1)
        per_token = -torch.min(ratio * a, ratio.clamp(1 - ft.epsilon, 1 + ft.epsilon) * a)
        held = ((ratio < 1 - ft.epsilon) & (a < 0)) | ((ratio > 1 + ft.epsilon) & (a > 0))  # no gradient
        kl_row = torch.zeros(len(m), dtype=logps.dtype, device=device)
        if self.reference is not None:
            if gen["ref"] is None:
                gen["ref"] = self.reference(module, gen["full"], gen["full_mask"], gen["comp"]).to(logps.dtype)
            d = gen["ref"] - logps
            kl = torch.exp(d) - d - 1
            per_token = per_token + ft.kl_coef * kl
            kl_row = ((kl * m).sum(1) / m.sum(1).clamp(min=1)).detach()
        if ft.loss_normalization == "token":
            loss = (per_token * m).sum() / m.sum().clamp(min=1)
        else:
            loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        stats = gen["stats"].clone()
        k = len(self.names)
        stats[:, 2 + k] = kl_row.double().cpu()
        stats[:, 5 + k] = (held.detach() * m).sum(1).double().cpu()
        if gen["reused"]:
            stats[0, -1] = 0.0  # no generation this step
        gen["reused"] = True
        return loss, stats

    def _buffers(self, batch: dict) -> bool:
        """Whether this micro-batch's generation serves more updates (num_iterations > 1)."""
        return self.ft.num_iterations > 1 and torch.is_grad_enabled() and "iteration" in batch

    def _generation(self, module, batch: dict, device) -> dict:
        """The micro-batch's completions, rewards and advantages: sampled and scored now, or the
        ones its first iteration sampled (num_iterations > 1: kept, and in the checkpoint)."""
        ft, g = self.ft, self.ft.group_size
        if self._buffers(batch):
            if batch["cycle"] != self.cycle:
                self.buffer, self.cycle = {}, batch["cycle"]
            kept = self.buffer.get(tuple(batch["draws"]))
            if kept is not None:
                return {**kept, **{k: kept[k].to(device) for k in ("full", "full_mask", "comp", "comp_mask", "old")},
                        "ref": None if kept["ref"] is None else kept["ref"].to(device)}
            if batch["iteration"] > 0 and not self.warned_regenerated:
                self.warned_regenerated = True
                self.say(f"iteration {batch['iteration'] + 1}/{ft.num_iterations} of a generation the checkpoint "
                         "does not hold (saved by another number of ranks): its completions are sampled again "
                         "from the policy as it is now")
        t0 = time.perf_counter()
        ids = batch["input_ids"].repeat_interleave(g, 0).to(device)
        mask = batch["attention_mask"].repeat_interleave(g, 0).to(device)
        draws = batch.get("draws") or [-1 - i for i in batch["index"]]  # validation: fixed per prompt
        noise = self._noise(draws, g).to(device)
        with self.engine.sampling() if self.engine is not None else contextlib.nullcontext(module) as policy:
            comp, comp_mask = self._sample(policy, ids, mask, noise)
        rewards, each = self._rewards(batch, comp, comp_mask)
        gen_s = time.perf_counter() - t0
        grouped = rewards.view(-1, g)
        std = grouped.std(1, keepdim=True).expand(-1, g).reshape(-1)
        adv = rewards - grouped.mean(1, keepdim=True).expand(-1, g).reshape(-1)
        if ft.scale_rewards:
            adv = adv / (std + 1e-4)
        lengths = comp_mask.sum(1).double().cpu()
        clipped = (~(comp == self._eos()).any(1)).double().cpu()
        first = torch.zeros(len(comp), 2, dtype=torch.float64)
        first[0] = torch.tensor([1.0, gen_s])
        kl = torch.zeros(len(comp), 1, dtype=torch.float64)  # filled in by each update
        stats = torch.cat([torch.stack([rewards, std], 1), each, kl, lengths.unsqueeze(1), clipped.unsqueeze(1),
                           torch.zeros_like(kl), first], 1)
        if not torch.is_grad_enabled():
            self._keep_samples(batch, comp, comp_mask, rewards, each)
        return {"full": torch.cat([ids, comp], 1), "full_mask": torch.cat([mask, comp_mask.to(mask.dtype)], 1),
                "comp": comp, "comp_mask": comp_mask, "adv": adv, "stats": stats, "old": None, "ref": None,
                "reused": False}

    # -- num_iterations > 1: the kept generations, per rank, in the checkpoint --------------

    def rank_state(self) -> dict:
        """This rank's kept generations (tensors and numbers: loadable with weights_only)."""
        if self.ft.num_iterations == 1 or not self.buffer:
            return {}
        keep = ("full", "full_mask", "comp", "comp_mask", "adv", "stats", "old")
        return {"cycle": self.cycle, "generations": [
            {"draws": torch.tensor(k), **{n: v[n].detach().cpu() for n in keep},
             **({"ref": v["ref"].detach().cpu()} if v["ref"] is not None else {})} for k, v in self.buffer.items()]}

    def resumed_rank(self, state: dict | None) -> None:
        if not state:
            return
        self.cycle = int(state["cycle"])
        self.buffer = {tuple(g["draws"].tolist()): {**{k: v for k, v in g.items() if k != "draws"},
                                                   "ref": g.get("ref"), "reused": True}
                       for g in state["generations"]}

    def _noise(self, draws: list[int], g: int) -> torch.Tensor:
        """[rows, max_new_tokens] uniform numbers, a row's from its own seeded generator."""
        rows = []
        for draw in draws:
            for j in range(g):
                key = hashlib.sha256(f"{self.seed}/{draw}/{j}".encode()).digest()
                gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
                rows.append(torch.rand(self.ft.max_new_tokens, generator=gen, dtype=torch.float64))
        return torch.stack(rows)

    def _eos(self) -> int:
        tok = self.tok
        return tok.eos_token_id if tok.eos_token_id is not None else -1

    @torch.no_grad()
    def _sample(self, model, ids: torch.Tensor, mask: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(completion tokens [rows, T], 1 up to and including each one's end of sequence)."""
        ft, eos = self.ft, self._eos()
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else max(eos, 0)
        was_training = model.training
        model.eval()  # the KV cache is off in train mode under activation checkpointing
        try:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            kwargs = {"logits_to_keep": 1} if self.trims else {}
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs)
            tokens = torch.full((len(ids), ft.max_new_tokens), pad, dtype=torch.long, device=ids.device)
            done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
            nxt_pos = pos[:, -1:] + 1
            steps = ft.max_new_tokens
            for t in range(ft.max_new_tokens):
                picked = pick(out.logits[:, -1], noise[:, t], ft.temperature, ft.top_p)
                picked = torch.where(done, torch.full_like(picked, pad), picked)
                tokens[:, t] = picked
                done |= picked == eos
                if t == ft.max_new_tokens - 1 or self._all_done(done):
                    steps = t + 1
                    break
                cache = getattr(out, "cache", None)  # transformers' KV cache (`past_key_values` before 5.x)
                if cache is None:
                    raise RuntimeError("the model returned no KV cache: GRPO samples with use_cache=True")
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                out = model(input_ids=picked[:, None], attention_mask=mask, position_ids=nxt_pos, cache=cache,
                            use_cache=True)
                nxt_pos = nxt_pos + 1
        finally:
            model.train(was_training)
        tokens = tokens[:, :steps]
        hit = tokens == eos
        keep = (hit.cumsum(1) - hit.long()) == 0  # up to and including the first end of sequence
        return tokens, keep

    def _all_done(self, done: torch.Tensor) -> bool:
        """Every completion ended (on every rank, where each forward is collective)."""
        flag = torch.tensor([int(bool(done.all()))])
        if self.sync_sampling:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag[0])

    def _token_logps(self, module, full: torch.Tensor, mask: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
        """[rows, T] log-probs of the completion tokens `comp` (the last T of `full`) through
        `module`, of logits / temperature."""
        n = comp.shape[1]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = {"logits_to_keep": n + 1} if self.trims else {}
        logits = module(input_ids=full, attention_mask=mask, position_ids=pos, **kwargs).logits[:, -n - 1 : -1]
        logp = torch.log_softmax(logits.float() / self.ft.temperature, dim=-1)
        return torch.gather(logp, 2, comp.unsqueeze(-1)).squeeze(-1)

    def _reference_logps(self, module, full, mask, comp) -> tuple[torch.Tensor]:
        """The reference's scorer (reference.py calls it through the reference it holds)."""
        with torch.no_grad():
            return (self._token_logps(module, full, mask, comp),)

    def _texts(self, comp: torch.Tensor, keep: torch.Tensor) -> list[str]:
        eos = self._eos()
        return [self.tok.decode([t for t, k in zip(row.tolist(), ks.tolist(), strict=True) if k and t != eos],
                                skip_special_tokens=True) for row, ks in zip(comp, keep, strict=True)]

    def _rewards(self, batch: dict, comp: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each completion's total reward, [rows, rewards] each reward's), float64 on the CPU."""
        g = self.ft.group_size
        prompts = [p for p in batch["prompts"] for _ in range(g)]
        texts = self._texts(comp, keep)
        chat = bool(prompts) and isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        fields = batch["fields"]
        names = sorted({k for f in fields for k in f} - {"prompts", "completions", "completion_ids"})
        extra = {k: [f.get(k) for f in fields for _ in range(g)] for k in names}
        ids = [row[k].tolist() for row, k in zip(comp, keep, strict=True)]
        cols = []
        for name, fn in zip(self.ft.reward_functions, self.functions, strict=True):
            cols.append(self._call(name, fn, prompts, completions, ids, extra, batch))
        if self.reward_model is not None:
            cols.append(self._score(prompts, texts, comp.device))
        each = torch.stack(cols, 1)
        return each @ self.weights, each

    def _call(self, name: str, fn, prompts, completions, ids, extra: dict, batch: dict) -> torch.Tensor:
        """A reward function's values, checked: a number per completion, or one line (exit 2)."""
        where = f"the prompt of {self.ft.prompt_field!r} {str(batch['prompts'][0])[:80]!r}"
        try:
            values = fn(prompts=prompts, completions=completions, completion_ids=ids, **extra)
        except Exception as e:  # noqa: BLE001 - the user's function: said, never a silent zero
            raise UserError(f"reward function {name} raised {type(e).__name__}: {e} (batch with {where})",
                            field="finetune.reward_functions") from None
        values = list(values) if isinstance(values, (list, tuple)) else values
        if not isinstance(values, list) or len(values) != len(prompts):
            raise UserError(f"reward function {name} returned {type(values).__name__}"
                            f"{f' of {len(values)}' if isinstance(values, list) else ''} for {len(prompts)} "
                            f"completions (batch with {where})", field="finetune.reward_functions",
                            expected="a list with a number per completion")
        for v, p in zip(values, prompts, strict=True):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserError(f"reward function {name} returned {v!r} for a completion of the prompt "
                                f"{str(p)[:80]!r}", field="finetune.reward_functions",
                                expected="a finite number per completion")
        return torch.tensor([float(v) for v in values], dtype=torch.float64)

    @torch.no_grad()
    def _score(self, prompts: list, texts: list[str], device) -> torch.Tensor:
        """The reward model's score of each prompt + completion, as a reward stage trained it."""
        model, tok = self.reward_model
        rows = [scoring_ids(p, t, tok) for p, t in zip(prompts, texts, strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].double().cpu()

    def _keep_samples(self, batch, comp, keep, rewards, each) -> None:
        g = self.ft.group_size
        texts = self._texts(comp, keep)
        for j, text in enumerate(texts):
            if len(self.samples) >= self.ft.samples_logged:
                return
            self.samples.append({"prompt": batch["prompts"][j // g], "completion": text, "reward": float(rewards[j]),
                                 **{n: float(each[j, k]) for k, n in enumerate(self.names)}})

    # -- what is logged --------------------------------------------------------------------

    def counts(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        stats = logits.double()
        return torch.cat([torch.tensor([float(len(stats))], dtype=torch.float64), stats.sum(0)])

    def metrics(self, val_loss: float, counts: torch.Tensor) -> dict:  # noqa: ARG002
        n, k = max(float(counts[0]), 1.0), len(self.names)
        c = [float(x) for x in counts[1:]]
        out = {"reward": c[0] / n, "reward_std": c[1] / n}
        out.update({f"rewards/{name}/mean": c[2 + i] / n for i, name in enumerate(self.names)})
        kl, length, clipped, held, micro, gen_s = c[2 + k :]
        if self.ft.kl_coef:
            out["kl"] = kl / n
        out.update({"completions/mean_length": length / n, "completions/clipped_ratio": clipped / n,
                    "time/generation_s": gen_s / max(micro, 1.0)})
        if self.ft.num_iterations > 1:  # the share of completion tokens the clip kept from moving
            out["clip_ratio/region_mean"] = held / max(length, 1.0)
        return out

    def evaluated(self, step: int, run) -> None:
        """After an evaluation: rank 0's first completions to samples/step_N.jsonl and W&B."""
        samples, self.samples = self.samples, []
        path = write_rows(run, "samples", step, samples)
        if path is not None:
            first = samples[0]
            run.mon.print(f"  sample (reward {first['reward']:.3f}): {str(first['prompt'])[:60]!r} -> "
                          f"{first['completion'][:80]!r}  [{len(samples)} in {path}]")


def pick(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row sampled from softmax(logits / temperature), within the top-p nucleus,
    by inverse transform of the row's uniform number `u` (float64 [rows])."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        cum = probs.cumsum(-1)
        probs = probs.masked_fill(cum - probs >= top_p, 0.0)  # the first token always stays
    cum = probs.cumsum(-1)
    k = torch.searchsorted(cum, (u * cum[:, -1]).unsqueeze(-1).to(cum.dtype)).clamp(max=probs.shape[-1] - 1)
    return order.gather(-1, k).squeeze(-1) if top_p < 1.0 else k.squeeze(-1)
