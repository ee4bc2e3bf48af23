"""Chat formatting and the post-instruction tokens.

Arditi et al. read activations at the tokens that follow the user's instruction in the chat
template (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``): the model has read the request
there but not yet answered. We find those tokens by formatting a placeholder instruction and
tokenizing what follows it, then check that every formatted prompt really ends with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from refusal.errors import ConfigError

_PLACEHOLDER = "\x00INSTRUCTION\x00"

# Templates we supply when a tokenizer has none (base models) or for tests of each family.
KNOWN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama2": (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
}


@dataclass(frozen=True)
class ChatFormat:
    """Turns instructions into model-ready prompt strings and knows the post-instruction tokens."""

    tokenizer: PreTrainedTokenizerBase
    template: str | None = None
    system_prompt: str | None = None

    def _render(self, instruction: str) -> str:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": instruction})
        template = self.template or self.tokenizer.chat_template
        if not template:
            raise ConfigError(
                "the tokenizer has no chat template; set model.chat_template to a Jinja template or one of "
                f"{sorted(KNOWN_TEMPLATES)}"
            )
        template = KNOWN_TEMPLATES.get(template, template)
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )

    def format(self, instructions: Sequence[str]) -> list[str]:
        return [self._render(text) for text in instructions]

    @property
    def post_instruction_text(self) -> str:
        rendered = self._render(_PLACEHOLDER)
        return rendered.split(_PLACEHOLDER, 1)[1]

    @property
    def post_instruction_ids(self) -> list[int]:
        ids = self.tokenizer(self.post_instruction_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("the chat template puts no tokens after the instruction; cannot locate positions")
        return list(ids)
