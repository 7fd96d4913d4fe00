"""GKD for the train stage: ms-swift's GKD trainer fed from our token cache, plus visual feature distillation.

ms-swift 4.6's GKDTrainer loads the frozen teacher, samples batches (RepeatSampler), buffers
generations and computes the logit JSD (`_compute_jsd_loss`). It encodes raw message rows
itself, so `use_cached_batches` replaces its two data hooks: cached items pass straight to the
template's collator, and on-policy rollouts (`lmbda` > 0) are generated from the cached prompt
ids. `use_gkd_loss` replaces its compute_loss with the same terms plus the visual ones:

    loss = sft_alpha · CE + llm_kd_weight · JSD(student, teacher) + Σ_place weight · d(student, teacher)

where place is `vit` (the vision tower's output, before the merger), `aligner` (the merger's
output) or `deepstack` (the deepstack mergers' outputs) and d is MSE or 1 − cosine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

VISUAL_PLACES = ("vit", "aligner", "deepstack")


@dataclass
class VisualKd:
    """Recipe block `visual_kd`: a weight per place (0 leaves it off) and the distance."""

    vit: float = 0.0
    aligner: float = 0.0
    deepstack: float = 0.0
    distance: str = "mse"

    def check(self, section: str) -> None:
        if self.distance not in ("mse", "cosine"):
            raise ValueError(f"{section}.distance must be mse or cosine, got {self.distance!r}")
        for place in VISUAL_PLACES:
            if getattr(self, place) < 0:
                raise ValueError(f"{section}.{place} must be ≥ 0, got {getattr(self, place)}")

    @property
    def weights(self) -> dict[str, float]:
        return {place: float(getattr(self, place)) for place in VISUAL_PLACES if getattr(self, place) > 0}


@dataclass
class GkdOptions:
    """Our GKD recipe keys (config_check.RECIPE_EXTENSIONS); popped before ms-swift's RLHFArguments."""

    llm_kd_weight: float = 1.0
    visual_kd: VisualKd = field(default_factory=VisualKd)

    def check(self, section: str) -> None:
        if self.llm_kd_weight < 0:
            raise ValueError(f"{section}.llm_kd_weight must be ≥ 0, got {self.llm_kd_weight}")


def vision_tower(model):
    """The Qwen-VL vision tower inside `model` (plain, PEFT-wrapped or accelerate-wrapped): the module with blocks and a merger."""
    for _, module in model.named_modules():
        if hasattr(module, "merger") and hasattr(module, "blocks"):
            return module
    raise ValueError("the model has no vision tower with a merger (a Qwen-VL model is needed for visual_kd)")


@contextlib.contextmanager
def captured_features(model, places):
    """Record the activations of `places` while the block runs: {place: [tensor, …]} (one per call of the module).

    vit: the merger's input (the tower's last hidden state); aligner: the merger's output;
    deepstack: each deepstack merger's output, in order.
    """
    features = {place: [] for place in places}
    handles = []
    if places:
        tower = vision_tower(model)
        if "vit" in features:
            handles.append(tower.merger.register_forward_pre_hook(lambda _m, args: features["vit"].append(args[0])))
        if "aligner" in features:
            handles.append(tower.merger.register_forward_hook(lambda _m, _a, out: features["aligner"].append(out)))
        if "deepstack" in features:
            for merger in getattr(tower, "deepstack_merger_list", []):
                handles.append(merger.register_forward_hook(lambda _m, _a, out: features["deepstack"].append(out)))
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


def feature_distance(student: list, teacher: list, distance: str):
    """Mean distance over the captured tensors of one place; None when nothing was captured (no images)."""
    import torch.nn.functional as F

    pairs = [(s, t.to(s.dtype)) for s, t in zip(student, teacher) if s.numel()]
    if not pairs or len(student) != len(teacher):
        return None
    if distance == "cosine":
        terms = [(1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean() for s, t in pairs]
    else:
        terms = [F.mse_loss(s.float(), t.float()) for s, t in pairs]
    return sum(terms) / len(terms)


def answer_start(labels: list[int]) -> int:
    """Where the last answer span begins: the prompt an on-policy rollout continues from."""
    start = len(labels)
    for i in range(len(labels) - 1, -1, -1):
        if labels[i] != -100:
            start = i
        elif start < len(labels):
            break
    return start


def complete_on_policy(model, items: list[dict], *, eos_ids: list[int], max_new_tokens: int, temperature: float) -> list[dict]:
    """Cached items with their last answer replaced by the model's own completion (GKD's on-policy branch)."""
    import torch

    completed = []
    for item in items:
        ids = list(item["input_ids"])
        start = answer_start(list(item["labels"]))
        inputs = {"input_ids": torch.tensor([ids[:start]]), "attention_mask": torch.ones(1, start, dtype=torch.long)}
        tokens = item.get("mm_token_type_ids")
        if tokens is not None:
            inputs["mm_token_type_ids"] = torch.as_tensor(tokens).reshape(1, -1)[:, :start]
        for key in ("pixel_values", "image_grid_thw"):
            if key in item:
                inputs[key] = item[key]
        inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=eos_ids[-1], **sampling)
        answer = out[0, start:].tolist()
        for i, token in enumerate(answer):
            if token in eos_ids:
                answer = answer[: i + 1]
                break
        new = {**item, "input_ids": ids[:start] + answer, "labels": [-100] * start + answer, "length": start + len(answer)}
        if tokens is not None:
            new["mm_token_type_ids"] = torch.as_tensor(tokens).reshape(1, -1)[:, :start].tolist()[0] + [0] * len(answer)
        completed.append(new)
    return completed


def use_cached_batches(trainer, max_new_tokens: int) -> None:
    """Feed swift's GKD trainer with cached items: collate them as they are, and roll out from cached prompt ids."""
    from swift.rlhf_trainers.gkd_loss import DataSource
    from swift.utils import to_device

    template = trainer.template
    tokenizer = template.tokenizer
    eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} - {None})

    def rollout(inputs):
        items = [{k: v for k, v in item.items() if k != "channel"} for item in inputs]
        on_policy = trainer.model.training and trainer._get_random_num() < trainer.lmbda
        trainer._data_source = DataSource.STUDENT if on_policy else DataSource.DATASET
        if on_policy:
            model = trainer.accelerator.unwrap_model(trainer.model)
            was_training = model.training
            model.eval()
            items = complete_on_policy(model, items, eos_ids=eos_ids, max_new_tokens=max_new_tokens,
                                       temperature=float(trainer.temperature))
            model.train(was_training)
        return items

    def encode(items):
        return to_device(template.data_collator(items), trainer.accelerator.device), None

    trainer._rollout_samples = rollout
    trainer._encode_samples = encode


def use_gkd_loss(trainer, options: GkdOptions, sft_alpha: float) -> None:
    """Replace the GKD trainer's compute_loss by the weighted terms of the module docstring, each logged on its own."""
    import torch
    from swift.rlhf_trainers.gkd_loss import DataSource, TeacherOutput

    weights = options.visual_kd.weights
    distance = options.visual_kd.distance
    places = list(weights)
    if trainer.teacher_model is None and not trainer._teacher_use_disable_adapter:
        raise ValueError("GKD needs a teacher model (train --teacher, or the run's base by default)")

    def teacher_context(model):
        """The teacher: its own frozen model, or (LoRA with the base as teacher) the student with its adapter off."""
        if trainer.teacher_model is not None:
            return trainer.teacher_model, contextlib.nullcontext()
        return model, trainer.accelerator.unwrap_model(model).disable_adapter()

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs, teacher_inputs = inputs["model_inputs"], inputs["teacher_model_inputs"]
        if trainer.get_use_logits_to_keep(True):
            trainer.prepare_logits_to_keep(model_inputs)
            trainer.prepare_logits_to_keep(teacher_inputs)
        labels = model_inputs["labels"]
        with captured_features(model, places) as student_features:
            outputs = model(**model_inputs)  # labels included: the CE comes from the model's own loss
        metrics = trainer.custom_metrics["train" if model.training else "eval"]
        on_dataset = inputs["gkd_batch"].data_source != DataSource.STUDENT
        loss = outputs.loss * sft_alpha if sft_alpha > 0 and on_dataset else outputs.loss * 0
        metrics["sft_loss"].update(outputs.loss.detach())
        if options.llm_kd_weight > 0 or places:
            forward = {k: v for k, v in teacher_inputs.items() if k != "labels"}
            teacher, context = teacher_context(model)
            with torch.no_grad(), context, captured_features(teacher, places) as teacher_features:
                teacher_out = teacher(**forward)
            if options.llm_kd_weight > 0:
                jsd = trainer._compute_jsd_loss(outputs.logits, TeacherOutput(full_logits=teacher_out.logits,
                                                                             labels=teacher_inputs["labels"]), labels)
                loss = loss + options.llm_kd_weight * jsd
                metrics["llm_kd_loss"].update((options.llm_kd_weight * jsd).detach())
            vision_terms = {}
            for place in places:
                term = feature_distance(student_features[place], teacher_features[place], distance)
                if term is not None:
                    vision_terms[place] = weights[place] * term
                    metrics[f"vision_kd_{place}"].update(vision_terms[place].detach())
            if vision_terms:
                vision = sum(vision_terms.values())
                loss = loss + vision
                metrics["vision_kd_loss"].update(vision.detach())
        trainer._compute_acc(outputs, labels)
        return (loss, outputs) if return_outputs else loss

    trainer.compute_loss = compute_loss
