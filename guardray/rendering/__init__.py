"""Rendering rows into token ids with the model's own chat template: `PromptRenderer` (a prompt or a
conversation row, the last user turn being the text that matters), `ConversationRenderer` (a chat and a
response to it, the response being the text that matters), the templates they render through, and `Encoded`."""
from guardray.rendering.pairs import ConversationRenderer, chat_conversation_renderer
from guardray.rendering.prompts import PromptRenderer, chat_renderer, check_personas
from guardray.rendering.spans import TRUNCATIONS, Encoded, caught, common_prefix
from guardray.rendering.templates import (TEMPLATE_DATE, ChatTemplate, PairTemplate, apply_template, chat_template,
                                          conversation_template)

__all__ = ["TEMPLATE_DATE", "TRUNCATIONS", "ChatTemplate", "ConversationRenderer", "Encoded", "PairTemplate",
           "PromptRenderer", "apply_template", "check_personas", "caught", "chat_conversation_renderer", "chat_renderer",
           "chat_template", "common_prefix", "conversation_template"]
