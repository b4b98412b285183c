"""`--job prune`: UPop structured pruning of an open_clip ViT CLIP, with optional cross-modal KD.

    python -m training.main --job prune --p 0.5 --epochs 4 --search-epochs 2 --KD \
        --model clipc-vit-t2-64 --pretrained logs/clip/checkpoints/epoch_4.pt --train-data train.tsv

Epochs `0 … search_epochs-1` search: masks on both towers (per head dim or per head, and per MLP unit) are
multiplied into the dense model; every `--search-interval` steps their gradients, accumulated since the
start of the search (UPop keeps the masks out of the optimizer, so nothing ever clears them), decide, in
one pool over both towers, which entries are cut for the current target π_t = p·sqrt((1 − cos(π(t+1)/T))/2)
(compress.models.pruning.allocate_masks). Cut entries fade as 1 − π_t/p and reach 0 at the last search step.
At the start of epoch `search_epochs` the weights are sliced into a genuinely smaller model
(compress.models.pruning.prune_clip), which the trainer swaps in (new optimizer), and the remaining epochs
fine-tune it (by default as many epochs as the search, as UPop). With `--KD` a frozen copy of the starting
model teaches during the search, as in CLIP-KDPruning: its softmax similarities are the contrastive targets
on every search step, and the feature and logit MSE terms are added on every search step but the mask-update
steps; the fine-tune trains on the plain contrastive loss. On shards reinforced with the starting model
(`clipcompress reinforce` with the same --model and --pretrained weights) the teacher's embeddings of the
stored views are read instead of computed (`--ignore-stored-embeddings`: computed); shards reinforced with
another teacher are refused under --KD.

Checkpoints: during search the spec is `masked_clip` (dense weights + current masks, so the monitor scores
what is being trained); after surgery `pruned_clip` (per-layer widths). The masks, their accumulated
gradients and the search length go into job_state, so a resume mid-search continues exactly.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from compress.models import pruning
from compress.models.compact_clip import TOWERS, to_compact, tower_refusal, transformer_towers
from compress.models.pretrained import create_clip
from compress.models.registry import build_model
from compress.ops import distill_losses
from compress.ops.profile import params_and_macs
from foundation.errors import CheckpointRefused, UserError
from training.data.reinforced import StoredViews, find_reinforcement
from training.distributed import all_reduce_sum
from training.jobs import Job, add_argument_once, add_siglip_bias
from training.jobs.distill import add_stored_embeddings_flag, stored_embeddings, stored_features


class PruneJob(Job):
    name = "prune"
    help = "UPop structured pruning (search, surgery, fine-tune) with optional cross-modal KD"
    sigmoid_loss = True

    @staticmethod
    def add_arguments(group) -> None:
        group.add_argument("--p", "--prune-ratio", dest="p", type=float, default=0.5,
                           help="fraction of prunable parameters (attention q/k/v/out and MLP weights of both "
                                "towers) to remove: 0.5 ≈ 2x, 0.75 ≈ 4x (under torchrun spell it "
                                "--prune-ratio: torchrun's own --print-completion makes a bare --p ambiguous)")
        group.add_argument("--search-epochs", type=int, default=None,
                           help="epochs of mask search before surgery; the rest of --epochs fine-tunes the pruned "
                                "model (default: --epochs minus --finetune-epochs, else half of an even --epochs: "
                                "UPop fine-tunes as many epochs as it searched)")
        group.add_argument("--finetune-epochs", type=int, default=None,
                           help="epochs of fine-tuning after surgery (alternative to --search-epochs)")
        group.add_argument("--finetune-schedule", default="restart", choices=["restart", "continue"],
                           help="learning rate after surgery: a fresh warm-up + cosine over the fine-tune epochs "
                                "(restart, as UPop) or the rest of one schedule over search and fine-tune (continue)")
        group.add_argument("--search-interval", type=int, default=0,
                           help="update the masks every N optimizer steps (0: about 100 updates over the search)")
        group.add_argument("--prune-heads", action="store_true",
                           help="prune whole attention heads instead of head dimensions shared across heads")
        group.add_argument("--round-to", type=int, default=1,
                           help="every pruned head dim and MLP width a multiple of N (8 or 16 for CPUs, 64 for GPU "
                                "tensor cores), within the same parameter budget (1: no rounding)")
        add_argument_once(group, "--KD", dest="KD", action="store_true",
                          help="a frozen copy of the starting model teaches during the search (CLIP-KDPruning: "
                               "soft contrastive targets, feature and logit MSE); the fine-tune is plain")
        group.add_argument("--w-kd-feat", type=float, default=1.0,
                           help="KD: weight of L_same = ½[MSE(î_s, î_t) + MSE(t̂_s, t̂_t)] (normalised features, "
                                "mean over batch and dimensions; CLIP-KDPruning: 1)")
        group.add_argument("--w-kd-logits", type=float, default=1.0,
                           help="KD: weight of L_diff = ½[MSE(i2t logits) + MSE(t2i logits)] against the teacher's "
                                "(CLIP-KDPruning: 1)")
        group.add_argument("--w-kd-soft-target", type=float, default=1.0,
                           help="KD: contrastive target = (1 − w)·ground truth + w·teacher softmax (CLIP-KDPruning: "
                                "1, the teacher's similarities replace the ground truth; 0: hard)")
        group.add_argument("--w-sp-attn", type=float, default=0.0117,
                           help="search: L1 weight on the attention masks (UPop's value)")
        group.add_argument("--w-sp-mlp", type=float, default=2e-4,
                           help="search: L1 weight on the MLP masks (UPop's value)")
        add_stored_embeddings_flag(group)

    def __init__(self, args, dist_info):
        super().__init__(args, dist_info)
        if not 0 <= args.p < 1:
            raise UserError(f"--p {args.p}: the pruned fraction must be in [0, 1)")
        if args.round_to < 1:
            raise UserError(f"--round-to {args.round_to}: must be at least 1")
        if not 0 <= args.w_kd_soft_target <= 1:
            raise UserError(f"--w-kd-soft-target {args.w_kd_soft_target}: must be in [0, 1]")
        search, finetune = args.search_epochs, args.finetune_epochs
        if search is None and finetune is None and args.epochs % 2:
            raise UserError(f"--epochs {args.epochs} is odd: UPop fine-tunes as many epochs as it searched, so give "
                            f"an even --epochs or choose the split with --search-epochs")
        if search is None:
            search = args.epochs - finetune if finetune is not None else args.epochs // 2
        if finetune is not None and search + finetune != args.epochs:
            raise UserError(f"--search-epochs {search} + --finetune-epochs {finetune} "
                            f"must equal --epochs {args.epochs}")
        if not 1 <= search < args.epochs:
            raise UserError(f"need 1 <= search epochs ({search}) < --epochs ({args.epochs}): the pruned model is "
                            f"fine-tuned for the remaining epochs")
        self.search_epochs = search
        self.pruned = False
        self.masks: pruning.Masks = {}
        self.search_steps = 0  # T: optimizer steps of the whole search
        self.interval = 0
        # the mask gradients of every finite search step so far, this rank's share (UPop's importance: the
        # masks are outside the optimizer, so their .grad only ever grows); mask.grad holds the current step
        self.importance: Dict[str, torch.Tensor] = {}
        self.next_step = 0  # index of the optimizer step the next loss() belongs to
        self.step_finite = True  # this rank's losses of the current step were all finite
        self.scaler = None
        self.loss_scale = 1.0  # fp16: the loss scale of the current step's backward
        self.loaded_state: Dict[str, Any] = {}
        self.teacher = None
        self.reinforcement = self.stored = None  # a reinforced --train-data; its embeddings when --KD reads them

    def lr_phase_starts(self, steps_per_epoch: int) -> List[int]:
        """Search, then fine-tune from surgery on its own schedule (UPop: cosine lr → 0 over the fine-tune)."""
        if self.args.finetune_schedule == "continue":
            return [0]
        return [0, self.search_epochs * steps_per_epoch]

    # --- models -------------------------------------------------------------------------------------

    def build_model(self, resume_spec: Optional[Dict[str, Any]] = None):
        args = self.args
        kind = (resume_spec or {}).get("kind")
        if kind not in (None, "masked_clip", "pruned_clip"):
            raise UserError(f"--job prune cannot resume a {kind!r} checkpoint (expected one written by --job prune)")
        start = None
        if resume_spec is None or args.KD:
            # the dense starting model: the student's first weights and, with --KD, the frozen teacher
            start = create_clip(args.model, args.pretrained)
            add_siglip_bias(start, args)  # --siglip on a model without a logit bias, as the clip job
            if not args.pretrained:
                logging.warning("--job prune without --pretrained: pruning a randomly initialised %s", args.model)
        if resume_spec is None:
            towers = transformer_towers(start)
            for tower in sorted(set(TOWERS) - set(towers)):
                logging.warning("--job prune: %s; UPop prunes the %s tower only", tower_refusal(start, tower),
                                " and ".join(towers))
            if not towers:
                raise UserError(f"--job prune: {args.model} has no transformer tower for UPop to prune "
                                f"({tower_refusal(start, 'image')})")
            model = to_compact(copy.deepcopy(start))
            self.masks = pruning.init_masks(model, prune_heads=args.prune_heads)
            pruning.attach_masks(model, self.masks)
            model.model_spec = pruning.masked_spec(start.model_spec, self.masks)
        else:
            model = build_model(resume_spec)
            self.pruned = kind == "pruned_clip"
        if args.KD:
            self.reinforcement, self.stored = stored_embeddings(args, "--model/--pretrained (the --KD teacher)",
                                                                args.model, args.pretrained)
            if self.stored is not None and not args.pretrained:
                raise UserError("--KD teaches with the starting model: without --pretrained it is a random one, "
                                f"not the teacher whose embeddings {self.stored.folder} stores; pass its weights")
        elif args.ignore_stored_embeddings:
            raise UserError("--ignore-stored-embeddings: only --KD reads a teacher's embeddings")
        else:
            self.reinforcement = find_reinforcement(args.train_data)
        if args.KD and self.stored is None:
            self.teacher = start.to(self.device).eval().requires_grad_(False)
            if args.precision == "bf16":
                self.teacher = self.teacher.to(torch.bfloat16)
            self.teacher.output_dict = True
        model.output_dict = True
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)  # kept by surgery (prune_clip copies the model)
        self.clip_loss = self.make_clip_loss(model)
        if self.siglip and self.stored is not None:
            raise UserError("--KD under the sigmoid loss (--siglip, a SigLIP model) needs the teacher's logit bias, "
                            "which stored embeddings do not carry: pass --ignore-stored-embeddings")
        return model

    def data_transforms(self, model):
        """On a reinforced set: its stored views (and with --KD reading them, the teacher's embeddings)."""
        transform, tokenizer = super().data_transforms(model)
        if self.reinforcement is not None:
            transform = StoredViews(self.reinforcement, embeddings=self.stored is not None)
        return transform, tokenizer

    # --- hooks --------------------------------------------------------------------------------------

    def on_train_start(self, ctx) -> None:
        model = ctx.unwrapped_model
        if self.pruned:
            self._log_size("pruned", model, ctx)
            return
        # masks are plain tensors (not buffers: see compact_clip.SplitAttention), so they follow the model here
        device = next(model.parameters()).device
        self.masks = {k: m.detach().to(device) for k, m in pruning.attached_masks(model).items()}
        pruning.attach_masks(model, self.masks)
        state = self.loaded_state
        for entry in ("masks", "mask_grads"):  # the shapes of this model's masks, before anything is copied
            for key, saved in state.get(entry, {}).items():
                if key in self.masks and saved.shape != self.masks[key].shape:
                    raise CheckpointRefused(f"job_state.{entry}.{key}: shape {list(saved.shape)}, the model's mask "
                                            f"has {list(self.masks[key].shape)}")
        steps_per_epoch = ctx.data.num_batches // self.args.accum_freq
        self.search_steps = int(state.get("search_steps") or self.search_epochs * steps_per_epoch)
        self.interval = self.args.search_interval or max(1, round(self.search_steps / 100))
        self.next_step, self.scaler = ctx.step, ctx.scaler
        for key, mask in self.masks.items():
            with torch.no_grad():
                if key in state.get("masks", {}):
                    mask.copy_(state["masks"][key])
            mask.requires_grad_(True)
            mask.grad = None
            self.importance[key] = torch.zeros_like(mask)
            if key in state.get("mask_grads", {}) and self.dist.rank == 0:
                self.importance[key] += state["mask_grads"][key].to(mask.device)  # other ranks add theirs from 0
        model.model_spec = pruning.masked_spec(pruning._base_spec(model.model_spec), self.masks)
        logging.info("prune: p=%.3f, search %d epochs = %d steps, masks updated every %d steps, %s units",
                     self.args.p, self.search_epochs, self.search_steps, self.interval,
                     "head" if self.args.prune_heads else "head-dim")
        self._log_size("dense", model, ctx)

    def on_epoch_start(self, epoch: int, ctx):
        if self.pruned or epoch < self.search_epochs:
            return None
        model = ctx.unwrapped_model
        if any(bool(((m != 0) & (m != 1)).any()) for m in self.masks.values()):
            # the search ended before its last scheduled update (e.g. shortened by a resume): finish the cut
            self._update_masks(ctx, self.args.p)
        pruned = pruning.prune_clip(model, {k: m.detach() for k, m in self.masks.items()})
        pruned.output_dict = True
        self.pruned, self.masks, self.importance = True, {}, {}
        self.teacher = None  # CLIP-KDPruning distils during the search only
        logging.info("prune: surgery at epoch %d", epoch)
        self._log_size("pruned", pruned, ctx)
        return pruned

    def on_step_end(self, ctx) -> None:
        super().on_step_end(ctx)  # the temperature clamp
        self.next_step = ctx.step
        if self.pruned:
            return
        self._accumulate_importance()
        t = ctx.step - 1  # index of the step just taken
        if self._is_update_step(t):
            self._update_masks(ctx, pruning.upop_target(self.args.p, t, self.search_steps))

    def _is_update_step(self, t: int) -> bool:
        return not self.pruned and t < self.search_steps and (t % self.interval == 0 or t == self.search_steps - 1)

    # --- the search ---------------------------------------------------------------------------------

    def _accumulate_importance(self) -> None:
        """Add this step's mask gradients to the importance, unless the step was non-finite on any rank: the
        trainer then skips the step (--skip-nonfinite-loss), and a NaN once added would poison every later
        decision, since the importance is never reset. One small collective per search step, so every rank
        makes the same choice."""
        scale = self.loss_scale if self.scaler is not None and self.scaler.is_enabled() else 1.0
        grads = {k: (m.grad.detach() / scale if m.grad is not None else torch.zeros_like(m))
                 for k, m in self.masks.items()}
        finite = torch.stack([torch.isfinite(g).all() for g in grads.values()]).all().float()
        flag = finite * float(self.step_finite)
        if self.dist.distributed:
            flag = all_reduce_sum(flag)
        if flag.item() == self.dist.world_size:
            for key, grad in grads.items():
                self.importance[key] += grad
        else:
            logging.warning("prune: step %d non-finite, its mask gradients are left out of the importance",
                            self.next_step)
        for mask in self.masks.values():
            mask.grad = None
        self.step_finite = True

    def _reduced_mask_grads(self) -> Dict[str, torch.Tensor]:
        """The importance: mask gradients accumulated since the start of the search, summed over ranks."""
        keys = list(self.masks)
        flat = all_reduce_sum(torch.cat([self.importance[k].flatten() for k in keys]))
        return dict(zip(keys, flat.split([self.masks[k].numel() for k in keys])))

    def _update_masks(self, ctx, target: float) -> None:
        model = ctx.unwrapped_model
        costs = pruning.mask_costs(model, self.masks)
        new = pruning.allocate_masks(self._reduced_mask_grads(), costs, target, self.args.p,
                                     round_to=self.args.round_to)
        with torch.no_grad():
            for key, mask in self.masks.items():
                mask.copy_(new[key])  # the importance carries on: UPop never resets it
        model.model_spec = pruning.masked_spec(pruning._base_spec(model.model_spec), self.masks)
        kept = pruning.kept_fraction(self.masks, costs)
        ctx.log_scalars({"prune/target": target, "prune/mask_value": 1 - target / self.args.p if self.args.p else 1.0,
                         "prune/kept_attention": kept["attention"], "prune/kept_mlp": kept["mlp"],
                         "prune/kept_all": kept["all"]})
        logging.info("prune: step %d target %.4f, kept attention %.3f mlp %.3f all %.3f",
                     ctx.step, target, kept["attention"], kept["mlp"], kept["all"])

    def _log_size(self, label: str, model, ctx) -> None:
        if not self.dist.is_master:
            return
        size = params_and_macs(model)
        ctx.log_scalars({f"prune/{k}": v for k, v in size.items()})
        logging.info("prune: %s model: %.3fM params, %.2fM image MACs, %.2fM text MACs per sample; layers %s",
                     label, size["params"] / 1e6, size["macs_image"] / 1e6, size["macs_text"] / 1e6,
                     pruning.layer_shapes(model) if label == "pruned" else "dense")

    # --- loss ---------------------------------------------------------------------------------------

    def loss(self, model, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        args = self.args
        out = model(batch["image"], batch["text"])
        image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
        losses: Dict[str, torch.Tensor] = {}
        if not self.siglip:
            logits = self.clip_loss.get_logits(image, text, scale)
            labels = self.clip_loss.get_ground_truth(image.device, logits[0].shape[0])
        # SigLIP: open_clip's SigLipLoss (across ranks) as the task loss; under --KD the sigmoid counterparts of
        # CLIP-KDPruning's terms over this rank's pairs (each pair's sigmoid loss stands alone: nothing to gather)
        if self.siglip and (not args.KD or self.pruned):
            contrastive = total = self.contrastive_loss(out)
        elif self.siglip:
            with torch.no_grad():
                teacher = self.teacher(batch["image"], batch["text"])
                teacher_logits = distill_losses.sigmoid_logits(teacher["image_features"], teacher["text_features"],
                                                               teacher["logit_scale"], teacher["logit_bias"])
            logits = distill_losses.sigmoid_logits(image, text, scale, out["logit_bias"])
            contrastive = distill_losses.soft_target_sigmoid_loss(logits, teacher_logits, args.w_kd_soft_target)
            feat = distill_losses.feature_kd_loss(image, text, teacher["image_features"], teacher["text_features"])
            # the pair logits are symmetric in the two directions: their one MSE is CLIP-KDPruning's L_diff
            logit = distill_losses.logit_mse_loss((logits, logits.T), (teacher_logits, teacher_logits.T))
            total = contrastive
            if not self._is_update_step(self.next_step):
                total = total + args.w_kd_feat * feat + args.w_kd_logits * logit
            losses.update(kd_feat_loss=feat, kd_logits_loss=logit)
        elif not args.KD or self.pruned:
            contrastive = (F.cross_entropy(logits[0], labels) + F.cross_entropy(logits[1], labels)) / 2
            total = contrastive
        else:
            with torch.no_grad():
                if self.stored is not None:  # the shards' embeddings of this batch's views and captions
                    teacher_image, teacher_text, teacher_scale = stored_features(batch, self.stored, image, True)
                    teacher = {"image_features": teacher_image, "text_features": teacher_text,
                               "logit_scale": teacher_scale}
                else:
                    teacher = self.teacher(batch["image"], batch["text"])
                teacher_logits = self.clip_loss.get_logits(teacher["image_features"], teacher["text_features"],
                                                           teacher["logit_scale"])
            # the contrastive target softened by the teacher's similarity distribution
            contrastive = distill_losses.soft_target_contrastive_loss(logits, teacher_logits, labels,
                                                                      args.w_kd_soft_target)
            feat = distill_losses.feature_kd_loss(image, text, teacher["image_features"], teacher["text_features"])
            logit = distill_losses.logit_mse_loss(logits, teacher_logits)
            total = contrastive
            if not self._is_update_step(self.next_step):
                # CLIP-KDPruning leaves L_same and L_diff out of the steps whose gradients end in a mask update
                total = total + args.w_kd_feat * feat + args.w_kd_logits * logit
            losses.update(kd_feat_loss=feat, kd_logits_loss=logit)
        losses["contrastive_loss"] = contrastive
        if not self.pruned and self.masks:
            attn = sum(m.abs().sum() for k, m in self.masks.items() if not k.endswith(".mlp"))
            mlp = sum(m.abs().sum() for k, m in self.masks.items() if k.endswith(".mlp"))
            sparsity = args.w_sp_attn * attn + args.w_sp_mlp * mlp
            total = total + sparsity
            losses["sparsity_loss"] = sparsity
        losses["loss"] = total
        if self.masks:
            self.step_finite = self.step_finite and bool(torch.isfinite(total.detach()))
            if self.scaler is not None and self.scaler.is_enabled():
                # fp16: the backward that follows is scaled, and the scale may change between steps
                self.loss_scale = self.scaler.get_scale()
        return losses

    # --- state --------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        # called on every rank (the checkpoint writer is collective): gradients are summed here so the
        # file holds the importance accumulated by all ranks
        if self.pruned or not self.masks:
            return {"pruned": self.pruned}
        grads = self._reduced_mask_grads()
        return {"pruned": False, "search_steps": self.search_steps,
                "masks": {k: m.detach().cpu().clone() for k, m in self.masks.items()},
                "mask_grads": {k: g.cpu().clone() for k, g in grads.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """The search's state from a checkpoint (what `state_dict` writes), its types checked first; the masks'
        shapes are checked against the model's at on_train_start."""
        if not isinstance(state.get("pruned", False), bool):
            raise CheckpointRefused(f"job_state.pruned: expected true or false, got {repr(state['pruned'])[:40]}")
        steps = state.get("search_steps")
        if steps is not None and (type(steps) is not int or steps < 0):
            raise CheckpointRefused(f"job_state.search_steps: expected an integer >= 0, got {repr(steps)[:40]}")
        for entry in ("masks", "mask_grads"):
            named = state.get(entry, {})
            if not isinstance(named, dict) or not all(
                    isinstance(key, str) and "." in key and isinstance(value, torch.Tensor) and value.dim() == 1
                    and value.is_floating_point() for key, value in named.items()):
                raise CheckpointRefused(f"job_state.{entry}: expected a mapping of mask names (TOWER.LAYER.UNIT) "
                                        "to 1-d float tensors")
        self.loaded_state = dict(state)
        for entry in ("masks", "mask_grads"):  # a checkpoint from before the towers were renamed: visual.* names
            if entry in state:
                self.loaded_state[entry] = pruning.current_mask_names(state[entry])
