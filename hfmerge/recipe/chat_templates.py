"""Chat templates a merge can be given by name, and the choice of one for the output.

The named templates render the well-known conversation formats (the same text mergekit 0.1.5's
templates of those names render, so a config gives the same tokenizer in both tools):
- `chatml`: `<|im_start|>ROLE`, a newline, `CONTENT<|im_end|>` and a newline per message;
- `llama3`: `<|start_header_id|>ROLE<|end_header_id|>`, two newlines, `CONTENT<|eot_id|>`,
  BOS first;
- `mistral`: `[INST] ... [/INST]` turns, an optional system message folded into the first;
- `alpaca`: `### Instruction:` / `### Input:` / `### Response:` sections;
- `exaone`: `[|ROLE|]CONTENT` turns closed by `[|endofturn|]` (mergekit's template of that
  name also renders its source's indentation; this one does not).
A recipe may also give `auto` (the template most of the models' tokenizers carry), its own Jinja
text, or a `.jinja` file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3 = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{{- message['content'] | trim -}}{{- '<|eot_id|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_message is defined -%}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- ' [INST] ' + message['content'] + ' [/INST]' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + message['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of "
    "an initial optional system message!') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

ALPACA = (
    "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{{- (systems | last).content | trim if systems else '' -}}{{- '\\n\\n' -}}"
    "{%- set headings = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n', "
    "'user_context': '### Input:\\n'} -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in headings -%}"
    "{{- headings[message['role']] + message['content'] | trim -}}"
    "{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
    "{{- '### Response:\\n' -}}"
    "{%- endif -%}"
)

EXAONE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '[|system|][|endofturn|]\\n' -}}"
    "{%- endif -%}"
    "{{- '[|' + message['role'] + '|]' + message['content'] -}}"
    "{{- '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"
)

NAMED = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "alpaca": ALPACA,
    "exaone": EXAONE,
}
AUTO = "auto"


def is_template_text(value: str) -> bool:
    """Whether `value` is Jinja text itself (not a name or a file)."""
    return "{" in value


def chat_template(value: str, model_templates: Sequence[str | None]) -> str | None:
    """The template text `value` names: a named template, `auto` (the one most of
    `model_templates` carry; None when none does), Jinja text, or a `.jinja` file's text."""
    if value in NAMED:
        return NAMED[value]
    if value == AUTO:
        found = [t.strip() for t in model_templates if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if is_template_text(value):
        return value
    return Path(value).read_text(encoding="utf-8")
