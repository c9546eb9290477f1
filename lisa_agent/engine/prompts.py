"""Conversation templates of the released LISA models, reproduced byte for byte.

``llava_v1`` (all released v1 checkpoints) renders a one-turn query as::

    A chat between a curious human and an artificial intelligence assistant. The assistant gives
    helpful, detailed, and polite answers to the human's questions. USER: <im_start><image><im_end>\\n{text} ASSISTANT:

(one line; ``\\n`` is a real newline). ``llava_llama_2`` wraps turns in ``[INST] ... [/INST]`` with a
``<<SYS>>`` block in the first one. Earlier turns are rendered with their answers, as LISA's own
``Conversation.get_prompt`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidArgumentError
from ..frames import IMAGE_TOKEN

IM_START = "<im_start>"
IM_END = "<im_end>"
SEG_TOKEN = "[SEG]"
#: Placeholder id for the image in prompt ids (LLaVA's IMAGE_TOKEN_INDEX); replaced by the projected CLIP features.
IMAGE_TOKEN_INDEX = -200

DEFAULT_ANSWER = "Sure, [SEG]."
EVAL_ANSWER = "[SEG]."


@dataclass(frozen=True)
class Template:
    """A LLaVA conversation style (only the two that LISA releases use)."""

    name: str
    system: str
    roles: tuple[str, str]
    style: str  # "two" (llava_v1) or "llama_2"
    sep: str
    sep2: str


TEMPLATES: dict[str, Template] = {
    "llava_v1": Template(
        name="llava_v1",
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        roles=("USER", "ASSISTANT"),
        style="two",
        sep=" ",
        sep2="</s>",
    ),
    "llava_llama_2": Template(
        name="llava_llama_2",
        system="You are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.",
        roles=("USER", "ASSISTANT"),
        style="llama_2",
        sep="<s>",
        sep2="</s>",
    ),
}


def get_template(name: str) -> Template:
    """Return the template called ``name`` or raise :class:`InvalidArgumentError` listing the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}") from None


def image_message(text: str, use_im_start_end: bool = True) -> str:
    """The first user message: the image placeholder, a newline, then the instruction."""
    image = IM_START + IMAGE_TOKEN + IM_END if use_im_start_end else IMAGE_TOKEN
    return image + "\n" + text


def render(template: Template, messages: Sequence[tuple[str, str]]) -> str:
    """Render ``messages`` [(role, text), ...] exactly as LLaVA's ``Conversation.get_prompt``.

    An empty text for the last (assistant) message leaves the prompt open for the answer.
    """
    if template.style == "two":
        seps = (template.sep, template.sep2)
        out = template.system + seps[0]
        for i, (role, message) in enumerate(messages):
            out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
        return out
    if template.style == "llama_2":
        out = ""
        for i, (_role, message) in enumerate(messages):
            if not message:
                continue
            if i == 0:
                message = f"<<SYS>>\n{template.system}\n<</SYS>>\n\n" + message
            if i % 2 == 0:
                out += template.sep + f"[INST] {message} [/INST]"
            else:
                out += " " + message + " " + template.sep2
        return out.lstrip(template.sep)  # LLaVA strips the characters of "<s>" from the left, as here
    raise InvalidArgumentError(f"unknown template style {template.style!r}")


def build_prompt(
    template: Template | str,
    query: str,
    history: Sequence[tuple[str, str]] = (),
    use_im_start_end: bool = True,
    answer: str = "",
) -> str:
    """Prompt for ``query`` after earlier (question, answer) turns; the image goes in the first turn.

    With ``answer`` empty the prompt ends open (``... ASSISTANT:``) for generation; with an answer the
    turn is closed as in LISA's training and evaluation (``... ASSISTANT: Sure, [SEG].</s>``).
    """
    tpl = get_template(template) if isinstance(template, str) else template
    user, assistant = tpl.roles
    messages: list[tuple[str, str]] = []
    turns = [*history, (query, answer)]
    for i, (question, answer) in enumerate(turns):
        messages.append((user, image_message(question, use_im_start_end) if i == 0 else question))
        messages.append((assistant, answer))
    return render(tpl, messages)
