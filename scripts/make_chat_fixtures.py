#!/usr/bin/env python3
"""Writes chat-template fixtures and transformers' renders of them for `model/tests/chat.rs`.

Run by hand when the fixtures change (needs transformers >= 5, tokenizers, jinja2):
    .venv/bin/python scripts/make_chat_fixtures.py model/tests/fixtures/chat

The templates are written here from the public text of the models' tokenizer_config.json (no hub
access when this was written; tool-calling branches are kept where they exercise a Jinja feature).
Each folder `<name>/` holds the tokenizer_config.json (special tokens as the model has them) and,
for `zephyr`, a chat_template.jinja that wins over the config's entry as in transformers 5. One
shared tokenizer.json (a byte-level BPE holding every template's control tokens, with a
post-processor that prepends `<s>` so that encoding with special tokens would show) sits at the
top; the script copies it into a temporary copy of each folder and loads that with
`AutoTokenizer.from_pretrained`, so the renders come from `apply_chat_template` itself.

expected.json:
  conversations  name -> [{role, content}]
  cases          [{template, conversation, add_generation_prompt, text | error, ids?}]
                 text: apply_chat_template(tokenize=False); ids: apply_chat_template(tokenize=True)
                 (which encodes with add_special_tokens=False); error: the template's own message.
  spans          [{template, conversation, start, end}]: byte span of the final assistant turn,
                 prefix = render(messages[:-1], add_generation_prompt=True), full = render(messages).
"""
import json
import os
import shutil
import sys
import tempfile

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

OUT = sys.argv[1] if len(sys.argv) > 1 else "model/tests/fixtures/chat"

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MISTRAL_V03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2-chat: a default-less <<SYS>> block, `.strip()` (a Python method) and false comparisons.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Zephyr's multi-line template: block tags without `-`, so trim_blocks and lstrip_blocks shape the
# output, and a trailing newline that keep_trailing_newline=False drops.
ZEPHYR = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}
"""

# Hermes-2-Pro style: a list of named templates; "default" is plain ChatML with a bos token.
HERMES_DEFAULT = (
    "{{bos_token}}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HERMES_TOOL_USE = "{{ 'tool_use template: not the default' }}"

# Not a model: the features the templates above touch only in their tool branches (tojson with its
# options, .items(), dict(), namespace lists, loop controls), and every special token transformers
# passes (named ones, a model-specific `image_token`; not additional_special_tokens).
PROBE = r"""{%- set ns = namespace(roles=[], chars=0) %}
{%- for message in messages %}
    {%- set ns.roles = ns.roles + [message.role] %}
    {%- set ns.chars = ns.chars + message.content|length %}
    {{- message | tojson }}
    {{- '\n' }}
    {%- for key, value in message.items() %}
        {%- if key == 'content' %}{% break %}{% endif %}
        {{- key + '=' + value + ';' }}
    {%- endfor %}
    {%- if message.content.startswith(' ') or message.content.endswith('\n') %}
        {{- 'padded:' + message.content.strip() + '|' + message.content.lstrip() + '|' + message.content.rstrip() + '\n' }}
    {%- endif %}
    {%- if not loop.last %}{% continue %}{% endif %}
    {{- 'words:' + message.content.split() | join(',') + '\n' }}
{%- endfor %}
{{- messages[-1:] | tojson(indent=2) }}
{{- '\n' + {'b': [1, 2.5, true, none], 'a': 'ü"\\'} | tojson(sort_keys=true) }}
{{- '\n' + {'b': 1, 'a': [1, 2]} | tojson(separators=(',', ':')) }}
{{- '\n' + dict(z=1, y='x') | tojson }}
{{- '\n' + 'roles=' + ns.roles | join('/') + ' chars=' + ns.chars|string }}
{{- '\n' + bos_token + '|' + eos_token + '|' + pad_token + '|' + unk_token + '|' + image_token }}
{{- '|' + (additional_special_tokens is defined)|string + '|' + (tools is none)|string + '|' + (documents is none)|string }}
{%- if add_generation_prompt %}
    {{- '\n<gen>' }}
{%- endif %}
"""

# A folder's tokenizer_config.json: special tokens as the model has them (AddedToken dicts in the
# newer "added_tokens_decoder" era configs are kept as dicts where the model ships them so).
def added(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False}


TEMPLATES = {
    "qwen2_5": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "unk_token": None, "chat_template": QWEN25},
    "llama3_1": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA31},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3},
    "mistral_v0_3": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                     "chat_template": MISTRAL_V03},
    "gemma": {"bos_token": added("<bos>"), "eos_token": added("<eos>"), "pad_token": added("<pad>"),
              "unk_token": added("<unk>"), "chat_template": GEMMA},
    "smollm2": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                "unk_token": "<|endoftext|>", "chat_template": SMOLLM2},
    "llama2": {"bos_token": added("<s>"), "eos_token": added("</s>"), "unk_token": added("<unk>"),
               "pad_token": None, "chat_template": LLAMA2},
    # The config's own entry must lose to chat_template.jinja.
    "zephyr": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
               "chat_template": "{{ 'this is the tokenizer_config.json template: chat_template.jinja must win' }}"},
    "hermes_list": {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                    "chat_template": [{"name": "tool_use", "template": HERMES_TOOL_USE},
                                      {"name": "default", "template": HERMES_DEFAULT}]},
    "probe": {"bos_token": "<s>", "eos_token": added("</s>"), "pad_token": "<pad>", "unk_token": "<unk>",
              "image_token": "<image>", "additional_special_tokens": ["<extra_0>"], "chat_template": PROBE},
}
JINJA_FILES = {"zephyr": ZEPHYR}

CONTROL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>",
           "<|start_header_id|>", "<|end_header_id|>", "<s>", "</s>", "<unk>", "<pad>", "[INST]", "[/INST]",
           "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<image>", "<extra_0>"]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system_single": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "What is 2+2?"}],
    "multi": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}],
    "system_multi": [{"role": "system", "content": "Answer in French."},
                     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bonjour"},
                     {"role": "user", "content": "Thanks"}],
    "unicode": [{"role": "user", "content": "你好，世界！🌍 café — naïve ß"},
                {"role": "assistant", "content": "こんにちは 👋🏽 Ελληνικά"}],
    "braces": [{"role": "user", "content": "Render {{ messages }} and {% if x %}y{% endif %} {# c #}"},
               {"role": "assistant", "content": "Use `{%- raw -%}` and }} {{"}],
    "empty": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    "padded": [{"role": "user", "content": "  spaced out \n\n"},
               {"role": "assistant", "content": "\n answer\twith  tabs  \n"}],
    "quotes": [{"role": "user", "content": "He said \"hi\" \\ back\n\t</script> & 'x' \u0001"}],
    "not_alternating": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
}
SPAN_CONVERSATIONS = ["multi", "unicode", "empty", "padded"]
IDS_CONVERSATIONS = ["system_multi", "unicode", "braces"]


def write_tokenizer(path):
    """A byte-level BPE with a few merges, every template's control tokens, and a `<s> $A` post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for conv in CONVERSATIONS.values() for m in conv] * 4
    corpus += ["the user and the assistant answer the question", "system message content"] * 8
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=CONTROL)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(path)


def dump_lines(expected):
    """JSON with one conversation, case or span a line: small, and diffs read case by case."""
    def one(v):
        return json.dumps(v, ensure_ascii=False)
    convs = ",\n".join(f"  {one(k)}: {one(v)}" for k, v in expected["conversations"].items())
    cases = ",\n".join(f"  {one(c)}" for c in expected["cases"])
    spans = ",\n".join(f"  {one(s)}" for s in expected["spans"])
    return (f'{{"transformers": {one(expected["transformers"])},\n"conversations": {{\n{convs}\n}},\n'
            f'"cases": [\n{cases}\n],\n"spans": [\n{spans}\n]}}\n')


def main():
    os.makedirs(OUT, exist_ok=True)
    tokenizer_json = os.path.join(OUT, "tokenizer.json")
    write_tokenizer(tokenizer_json)
    for name, cfg in TEMPLATES.items():
        folder = os.path.join(OUT, name)
        os.makedirs(folder, exist_ok=True)
        full = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, **cfg}
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(full, f, indent=2, ensure_ascii=False)
            f.write("\n")
        if name in JINJA_FILES:
            with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(JINJA_FILES[name])

    cases, spans = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in TEMPLATES:
            folder = os.path.join(tmp, name)
            shutil.copytree(os.path.join(OUT, name), folder)
            shutil.copy(tokenizer_json, folder)
            tok = AutoTokenizer.from_pretrained(folder)
            for conv_name, conv in CONVERSATIONS.items():
                for gen in (False, True):
                    case = {"template": name, "conversation": conv_name, "add_generation_prompt": gen}
                    try:
                        case["text"] = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
                    except Exception as e:  # the template's raise_exception
                        case["error"] = str(e)
                        assert type(e).__name__ == "TemplateError", (name, conv_name, e)
                    else:
                        if gen and conv_name in IDS_CONVERSATIONS:
                            out = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
                            ids = out["input_ids"] if hasattr(out, "keys") else out
                            assert ids == tok(case["text"], add_special_tokens=False)["input_ids"]
                            assert ids != tok(case["text"])["input_ids"], "the post-processor should show"
                            case["ids"] = ids
                    cases.append(case)
            for conv_name in SPAN_CONVERSATIONS:
                conv = CONVERSATIONS[conv_name]
                try:
                    prefix = tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
                    full = tok.apply_chat_template(conv, tokenize=False)
                except Exception:
                    continue
                if not full.startswith(prefix):
                    continue
                spans.append({"template": name, "conversation": conv_name,
                              "start": len(prefix.encode()), "end": len(full.encode())})

    expected = {"transformers": transformers.__version__, "conversations": CONVERSATIONS,
                "cases": cases, "spans": spans}
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        f.write(dump_lines(expected))
    errors = sum("error" in c for c in cases)
    print(f"{len(cases)} cases ({errors} errors), {len(spans)} spans -> {OUT}/expected.json")


if __name__ == "__main__":
    main()
