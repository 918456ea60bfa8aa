"""One prompt encoder: how a prompt becomes the policy's token ids, and which ids end its turn.

A prompt is text or a conversation: a list of {"role", "content"} messages, TRL's "conversational"
format. Text is tokenized as it is, with the tokenizer's special tokens (a BOS where it adds one), the
raw-text path of a model without a chat template. A conversation is rendered by the tokenizer's chat
template with add_generation_prompt=True and tokenized exactly as transformers' apply_chat_template
does, so the ids equal `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.
Sampling, pair building, the trainers, evaluation, DeRa and Serve all encode through `PromptEncoder`,
so a completion is trained and scored after the very ids it was drawn after.

A chat model ends its turn with a token such as <|im_end|> or <|eot_id|>, which need not be its
tokenizer's eos; generation_config.json may list several eos ids. `stop_ids` holds all of them, and
every decode loop stops on any.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union

Message = dict
Prompt = Union[str, list]  # text, or a list of {"role", "content"} messages
ROLES = ("system", "user", "assistant", "tool")


def is_conversation(prompt: Any) -> bool:
    return isinstance(prompt, list)


def check_prompt(prompt: Any, where: str = "prompt") -> Prompt:
    """The prompt unchanged when it is non-empty text or a well-formed conversation (a non-empty list of
    {"role", "content"} with a known role and text content, ending on a turn the model answers: not an
    assistant message); otherwise a ValueError naming `where` and what is allowed."""
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where} must be a non-empty string or a list of {{role, content}} messages, got {prompt!r:.60}")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}[{i}]: a message is {{role, content}}, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}[{i}].role: one of {', '.join(ROLES)}, got {m['role']!r:.40}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}[{i}].content: text, got {type(m['content']).__name__}")
    if prompt[-1]["role"] == "assistant":
        raise ValueError(f"{where}[{len(prompt) - 1}].role: the last message is the one the model answers "
                         "(user, system or tool), not assistant")
    return prompt


def prompt_text(prompt: Prompt) -> str:
    """A one-line label of a prompt for logs and tables: the text, or the last message's content."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def completion_text(completion: Any, where: str = "completion") -> str:
    """The text of a completion given as text or as TRL's conversational [{"role": "assistant", ...}]."""
    if isinstance(completion, str):
        return completion
    if (isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict)
            and completion[0].get("role") == "assistant" and isinstance(completion[0].get("content"), str)):
        return completion[0]["content"]
    raise ValueError(f"{where}: text or one assistant message [{{role: assistant, content}}], got {completion!r:.80}")


def stop_ids_of(tokenizer, generation_eos: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """Every id that ends the model's turn: the tokenizer's eos, then each id of the model's
    generation_config.eos_token_id (an int or a list), in that order, without repeats."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += list(generation_eos) if isinstance(generation_eos, (list, tuple)) else [generation_eos] if generation_eos is not None else []
    return tuple(dict.fromkeys(int(i) for i in ids))


def generation_eos(model: str | Path) -> int | list[int] | None:
    """The eos_token_id of a model's generation_config.json: read from a model directory, or for a hub
    name from transformers' cache (None when it has none or it cannot be read offline)."""
    import json

    f = Path(model) / "generation_config.json"
    if f.is_file():
        return json.loads(f.read_text()).get("eos_token_id")
    if Path(model).exists():
        return None
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(str(model)).eos_token_id
    except (OSError, ValueError):
        return None


class PromptEncoder:
    """A policy tokenizer's view of prompts: ids (templated for conversations), left-padded batches,
    and the ids that end a turn."""

    def __init__(self, tokenizer, stop_ids: Sequence[int] | None = None):
        self.tokenizer = tokenizer
        self.stop_ids = tuple(stop_ids) if stop_ids is not None else stop_ids_of(tokenizer)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def ids(self, prompt: Prompt) -> list[int]:
        """The token ids the model reads before its answer."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        self._need_template()
        out = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def _need_template(self) -> None:
        if not self.has_template:
            raise ValueError(f"a conversation needs a tokenizer with a chat template; {self.tokenizer.name_or_path} "
                             "has none (give prompts as text, or use a model with one)")

    def text(self, prompt: Prompt) -> str:
        """What the model reads, as text: the prompt, or the conversation rendered by the template."""
        if isinstance(prompt, str):
            return prompt
        self._need_template()
        return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)

    def batch_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        if all(isinstance(p, str) for p in prompts):  # one fast batched call for the raw-text path
            return [list(ids) for ids in self.tokenizer(list(prompts))["input_ids"]] if prompts else []
        return [self.ids(p) for p in prompts]

    def completion_ids(self, completion: str, ended: bool = True) -> list[int]:
        """A completion's ids as the sampler would have drawn them: its text without special tokens,
        then the first stop id when the turn ended (a conversation's answer; a raw-text completion ends
        with eos only if `ended`)."""
        ids = list(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
        return ids + [self.stop_ids[0]] if ended and self.stop_ids else ids

    def pad_left(self, prompts: Sequence[Prompt], device="cpu"):
        """Left-padded (input_ids, attention_mask) for a batch of prompts."""
        return pad_left(self.batch_ids(prompts), self.tokenizer.pad_token_id, device)


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device="cpu"):
    """(input_ids, attention_mask), left-padded with `pad_id`."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)
