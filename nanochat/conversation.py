"""
What a chat conversation is, checked in one place for the tokenizer (before it renders), the tasks (when
they load data files) and the web server (once it has read a request):

    {"messages": [{"role": "system" | "user" | "assistant", "content": str | [parts]}, ...], ...}

An optional leading system message, then user and assistant alternating, starting with user. Content is a
string; an assistant's may be a list of parts {"type": "text" | "python" | "python_output", "text": str}.

Two rules differ on purpose, each a flag. strict (default): a data file's row must be the {"messages"}
dict, each message exactly role and content, none empty (an empty turn, or a key training would silently
drop, is a mistake in the file); the tokenizer and the server pass strict=False (a bare list, other keys
ignored, and empty content: the web page sends back a reply its user stopped before the first token).
ends_with_user: the server replies to the last message, so it must be the user's; render_for_completion
instead drops a trailing assistant message (evaluation hands it whole conversations, gold answer included).
"""
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")
ALTERNATION = "after an optional leading system message, roles alternate user/assistant starting with user"


class ConversationError(ValueError):
    """A malformed conversation. index: the message at fault (None: the conversation as a whole); field:
    "role" or "content" when one field is at fault; reason: the message without its "message i" prefix,
    so the server can name the message the way its clients do (messages[i])."""

    def __init__(self, reason, index=None, field=None):
        super().__init__(reason if index is None else f"message {index} {reason}")
        self.reason, self.index, self.field = reason, index, field


def validate_conversation(conversation, *, strict=True, ends_with_user=False):
    """The conversation's list of messages (the caller's own, unchanged) when it is well formed, else a
    ConversationError (a ValueError) naming the message and the rule it breaks. See the module docstring
    for strict and ends_with_user."""
    if isinstance(conversation, dict) and isinstance(conversation.get("messages"), list):
        messages = conversation["messages"]
    elif isinstance(conversation, list) and not strict:
        messages = conversation
    else:
        raise ConversationError('a conversation must be a dict with a "messages" list'
                                + ("" if strict else " or a list of messages"))
    if not messages:
        raise ConversationError("the conversation is empty: it has no messages")
    start = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError("must be a dict with 'role' and 'content'", i)
        extra = set(m) - {"role", "content"}
        if strict and extra:
            raise ConversationError(f"has keys besides 'role' and 'content' ({', '.join(sorted(map(str, extra)))}): "
                                    "training would ignore them; remove them", i)
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ConversationError(f"has role {role!r}, not one of {ROLES}", i, "role")
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if i >= start and role != expected:
            raise ConversationError(f"has role {role!r}, expected {expected!r} ({ALTERNATION})", i, "role")
        if isinstance(content, list) and role == "assistant":
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                    raise ConversationError(f"part {j}: must be a dict with a 'text' string", i, "content")
                if part.get("type") not in PART_TYPES:
                    raise ConversationError(f"part {j}: unknown part type {part.get('type')!r} (expected one of "
                                            f"{PART_TYPES})", i, "content")
        elif not isinstance(content, str):
            only = " or a list of parts" if role == "assistant" else ""
            raise ConversationError(f"({role}): content must be a string{only}", i, "content")
        if strict and not content:
            raise ConversationError(f"({role}): empty content", i, "content")
    if ends_with_user and messages[-1]["role"] != "user":
        raise ConversationError("the last message must have role 'user': the reply answers it", field="role")
    if start == len(messages):
        raise ConversationError("a system message must be followed by a user message")
    return messages


def content_text(content):
    """The plain text of a message's content (parts joined, tool calls and outputs included as their text)."""
    return content if isinstance(content, str) else "".join(part["text"] for part in content)
